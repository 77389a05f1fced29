"""LAME vs a numpy transcription of fiveai/LAME (affinities, bound optimisation, stopping rule); sigma = 0."""

import jax
import numpy as np
import pytest

from jaxpeft.models.resnet import ResNet
from jaxpeft.tta import core, lame
from tests.tta import torch_reference as ref


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_affinity(feats, affinity, knn, force_symmetry):
  feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  n = len(feats)
  dist = np.linalg.norm(feats[None] - feats[:, None], axis=-1)
  if affinity == "rbf":
    sigma = np.sort(dist, axis=-1)[:, min(knn, n) - 1].mean()
    w = np.exp(-(dist**2) / (2 * sigma**2))
  elif affinity == "knn":
    w = np.zeros((n, n))
    for i in range(n):
      w[i, np.argsort(dist[i], kind="stable")[1 : min(knn + 1, n)]] = 1.0
  else:
    w = feats @ feats.T
  return (w + w.T) / 2 if force_symmetry else w


def _np_laplacian_optimization(probs, w, lam=1.0, max_steps=100):
  unary = -np.log(probs + 1e-10)
  y, old_e = _np_softmax(-unary), float("inf")
  for i in range(max_steps):
    pairwise = lam * w @ y
    y = _np_softmax(-unary + pairwise)
    e = (unary * y - lam * pairwise * y + y * np.log(np.clip(y, 1e-20, None))).sum()
    if i > 1 and abs(e - old_e) <= 1e-8 * abs(old_e):
      break
    old_e = e
  return y


def _source(model, images, config):
  variables = model.init(jax.random.key(0), images)
  params = jax.tree.map(lambda x: x, variables["params"])
  params["head"]["kernel"] = params["head"]["kernel"] * 5  # confident, disagreeing predictions
  model_state = {"batch_stats": variables["batch_stats"]}
  state = lame.init(params, model_state, config)
  logits, feats = core.forward_with_features(config, params, model_state, images, batch_stats=False)
  return state, _np_softmax(np.asarray(logits, np.float64)), np.asarray(feats, np.float64)


@pytest.mark.parametrize("affinity,force_symmetry", [("rbf", False), ("knn", True), ("linear", False)])
def test_lame_matches_numpy_transcription(affinity, force_symmetry):
  model = ResNet(num_classes=4, stage_sizes=(1,), width=6)
  images = np.random.default_rng(0).standard_normal((12, 8, 8, 1)).astype(np.float32)
  config = lame.Config(model.apply, affinity=affinity, knn=3, force_symmetry=force_symmetry)
  state, probs, feats = _source(model, images, config)
  _, logits = jax.jit(lame.step)(state, images)
  expected = _np_laplacian_optimization(probs, _np_affinity(feats, affinity, 3, force_symmetry))
  np.testing.assert_allclose(jax.nn.softmax(logits), expected, atol=2e-5)
  assert not np.allclose(expected, probs, atol=1e-3)  # the correction changed something


@pytest.mark.parametrize("batch,knn", [(1, 5), (12, 1)])
def test_lame_rbf_with_zero_sigma_takes_the_kernel_limit(batch, knn):
  """One image or knn=1: sigma = 0; the reference's 0 / 0 gives NaN, here W = [distance == 0]."""
  model = ResNet(num_classes=4, stage_sizes=(1,), width=6)
  images = np.random.default_rng(0).standard_normal((batch, 8, 8, 1)).astype(np.float32)
  config = lame.Config(model.apply, knn=knn)
  state, probs, feats = _source(model, images, config)
  with np.errstate(invalid="ignore"):
    assert np.isnan(_np_affinity(feats, "rbf", knn, False)).any()  # the reference: NaN on the diagonal
  _, logits = jax.jit(lame.step)(state, images)
  expected = _np_laplacian_optimization(probs, np.eye(batch))  # distinct images: distance 0 on the diagonal only
  np.testing.assert_allclose(jax.nn.softmax(logits), expected, atol=2e-5)
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(probs, -1))


def test_lame_needs_sown_features():
  model, params, model_state = ref.flax_model()
  state = lame.init(params, model_state, lame.Config(model.apply))
  with pytest.raises(ValueError, match="needs the model's features"):
    lame.step(state, ref.batches(1)[0])
