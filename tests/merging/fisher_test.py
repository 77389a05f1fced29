"""Fisher merging against a torch transcription of the paper's formula, per-example gradients from torch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft import merging


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(6, name="hidden")(x)))


MODEL = _MLP()
X = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
LABELS = np.arange(10) % 3
PATHS = [("hidden", "kernel"), ("hidden", "bias"), ("out", "kernel"), ("out", "bias")]


def _params(seed):
  return MODEL.init(jax.random.key(seed), X[:1])["params"]


def _torch_fisher(params, labels=None):
  """(1/N) Σ_n Σ_c p_c (∇ log p_c)² (or (∇ log p_label)² with labels), one torch autograd call per gradient."""
  leaves = [torch.tensor(np.asarray(params[m][k]), dtype=torch.float64, requires_grad=True) for m, k in PATHS]
  fisher = [torch.zeros_like(leaf) for leaf in leaves]
  for n, x in enumerate(torch.tensor(X, dtype=torch.float64)):
    hidden_kernel, hidden_bias, out_kernel, out_bias = leaves
    log_probs = torch.log_softmax(torch.tanh(x @ hidden_kernel + hidden_bias) @ out_kernel + out_bias, -1)
    classes = range(3) if labels is None else [int(labels[n])]
    for c in classes:
      grads = torch.autograd.grad(log_probs[c], leaves, retain_graph=True)
      p = 1.0 if labels is not None else log_probs[c].exp().detach()
      fisher = [f + p * g**2 for f, g in zip(fisher, grads)]
  return [f.numpy() / len(X) for f in fisher]


def test_expected_and_empirical_fisher_equal_torch():
  params = _params(0)
  logits = lambda p, x: MODEL.apply({"params": p}, x)
  got = merging.expected_fisher(logits, params, [X[:6], X[6:]])
  for (m, k), want in zip(PATHS, _torch_fisher(params)):
    np.testing.assert_allclose(got[m][k], want, rtol=1e-4, atol=1e-7)
  log_lik = lambda p, ex: jax.nn.log_softmax(logits(p, ex[0]))[ex[1]]
  got = merging.empirical_fisher(log_lik, params, [(X[:4], LABELS[:4]), (X[4:], LABELS[4:])])
  for (m, k), want in zip(PATHS, _torch_fisher(params, LABELS)):
    np.testing.assert_allclose(got[m][k], want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("favor_target_model, normalize_fishers", [(True, True), (False, False)])
def test_merge_equals_reference_formula(favor_target_model, normalize_fishers):
  models = [_params(s) for s in (1, 2, 3)]
  fishers = [_torch_fisher(p) for p in models]
  fishers[1][0][0] = 0.0  # a row with no information in a donor: the floor decides
  fisher_trees = [{m: {} for m, _ in PATHS} for _ in models]
  for tree, fisher in zip(fisher_trees, fishers):
    for (m, k), f in zip(PATHS, fisher):
      tree[m][k] = f.astype(np.float32)
  weights = [0.5, 0.3, 0.2]
  got = merging.fisher_merge(
      models, fisher_trees, weights, favor_target_model=favor_target_model, normalize_fishers=normalize_fishers
  )
  lambdas = [
      w / np.sqrt(sum(np.sum(f**2) for f in fisher)) if normalize_fishers else w
      for w, fisher in zip(weights, fishers)
  ]
  for i, (m, k) in enumerate(PATHS):
    floored = [
        np.maximum(f[i], 1e-6) if (j == 0 or not favor_target_model) else f[i] for j, f in enumerate(fishers)
    ]
    want = sum(l * f * np.asarray(p[m][k], np.float64) for l, f, p in zip(lambdas, floored, models))
    want /= sum(l * f for l, f in zip(lambdas, floored))
    np.testing.assert_allclose(got[m][k], want, rtol=1e-4, atol=1e-6)
