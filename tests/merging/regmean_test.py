"""RegMean: captured Grams equal XᵀX/n; the merged kernel is the least-squares minimiser the paper defines."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import merging


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(6, name="hidden")(x)))


MODEL = _MLP()
APPLY = lambda p, x: MODEL.apply({"params": p}, x)
RNG = np.random.default_rng(0)
INPUTS = [RNG.normal(size=(12, 4)).astype(np.float32), RNG.normal(size=(7, 4)).astype(np.float32) * 2]
MODELS = [MODEL.init(jax.random.key(s), INPUTS[0][:1])["params"] for s in (1, 2)]


def _layer_inputs(params, x):
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  return {
      "hidden/kernel": x.astype(np.float64),
      "out/kernel": np.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"]),
  }


def test_grams_are_mean_input_outer_products():
  grams = merging.gram_matrices(APPLY, MODELS[0], [INPUTS[0][:5], INPUTS[0][5:]])
  for path, x in _layer_inputs(MODELS[0], INPUTS[0]).items():
    np.testing.assert_allclose(grams[path], x.T @ x / len(x), rtol=1e-5, atol=1e-6)


def test_merge_minimises_the_summed_output_error():
  grams = [merging.gram_matrices(APPLY, p, [x]) for p, x in zip(MODELS, INPUTS)]
  merged = merging.regmean(MODELS, grams)
  per_model = [_layer_inputs(p, x) for p, x in zip(MODELS, INPUTS)]
  for path in ("hidden/kernel", "out/kernel"):
    module = path.split("/")[0]
    # argmin_W Σ_i ||X_i W - X_i W_i||² / n_i as one stacked least-squares problem
    rows = np.concatenate([x[path] / np.sqrt(len(x[path])) for x in per_model])
    targets = np.concatenate(
        [
            x[path] / np.sqrt(len(x[path])) @ np.asarray(p[module]["kernel"], np.float64)
            for x, p in zip(per_model, MODELS)
        ]
    )
    want = np.linalg.lstsq(rows, targets, rcond=None)[0]
    np.testing.assert_allclose(merged[module]["kernel"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        merged[module]["bias"], (MODELS[0][module]["bias"] + MODELS[1][module]["bias"]) / 2, atol=1e-7
    )


def test_reduced_off_diagonals_follow_the_closed_form():
  grams = [merging.gram_matrices(APPLY, p, [x]) for p, x in zip(MODELS, INPUTS)]
  got = merging.regmean(MODELS, grams, alpha=0.3)["out"]["kernel"]
  reduced = [
      0.3 * np.asarray(g["out/kernel"], np.float64) + 0.7 * np.diag(np.diag(g["out/kernel"])) for g in grams
  ]
  want = np.linalg.inv(sum(reduced)) @ sum(
      g @ np.asarray(p["out"]["kernel"], np.float64) for g, p in zip(reduced, MODELS)
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="missing for some models"):
    merging.regmean(MODELS, [grams[0], {"out/kernel": grams[1]["out/kernel"]}])
