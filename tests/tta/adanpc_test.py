"""AdaNPC vs a numpy transcription of yfzhang114/AdaNPC (MomentumQueue's kNN vote, extend_test)."""

import jax
import numpy as np
import pytest

from jaxpeft.tta import adanpc, core
from tests.tta import torch_reference as ref


def _normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _NumpyAdaNPC:
  """The reference's AdaNPC.forward_and_adapt over a growing memory (no random first row)."""

  def __init__(self, features, labels, k, temperature, beta, classes):
    self.memory, self.labels = _normalize(features), labels
    self.k, self.temperature, self.beta, self.classes = k, temperature, beta, classes

  def __call__(self, x):
    dist = _normalize(x) @ self.memory.T
    index = np.argsort(-dist, axis=1, kind="stable")[:, : self.k]
    top = np.take_along_axis(dist, index, 1) / self.temperature
    w = np.exp(top - top.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    p = np.minimum((np.eye(self.classes)[self.labels[index]] * w[..., None]).sum(1) + 1e-5, 1.0)
    soft = np.exp(p) / np.exp(p).sum(1, keepdims=True)
    keep = soft.max(1) >= self.beta
    self.memory = np.concatenate([self.memory, _normalize(x[keep])])
    self.labels = np.concatenate([self.labels, p.argmax(1)[keep]])
    return p


@pytest.mark.parametrize("beta", [0.1, 0.4])
def test_adanpc_matches_numpy_transcription(beta):
  classes, k = ref.CLASSES, 5
  model, params, model_state = ref.flax_model(sow_features=True)
  rng = np.random.default_rng(0)
  clean = ref.batches(2, seed=5)
  clean_labels = [rng.integers(0, classes, 8) for _ in range(2)]
  stream = [x + 0.5 for x in ref.batches(3)]
  config = adanpc.Config(model.apply, num_classes=classes, k=k, temperature=0.1, beta=beta, memory_size=32)
  memory = adanpc.prepare(params, model_state, config, list(zip(clean, clean_labels)))
  state = adanpc.init(params, model_state, config, **memory)
  features = jax.jit(lambda x: core.forward_with_features(config, params, model_state, x, batch_stats=False)[1])
  feats = lambda x: np.asarray(features(x))
  source = np.concatenate([feats(x) for x in clean]).astype(np.float64)
  reference = _NumpyAdaNPC(source, np.concatenate(clean_labels), k, 0.1, beta, classes)
  step = jax.jit(adanpc.step)
  for images in stream:
    state, logits = step(state, images)
    np.testing.assert_allclose(np.exp(logits), reference(feats(images).astype(np.float64)), atol=2e-5)
  added = int(state.extra["num_added"])
  assert added == len(reference.labels) - 16
  np.testing.assert_allclose(state.extra["memory"][: 16 + added], reference.memory, atol=1e-5)
  np.testing.assert_array_equal(state.extra["labels"][: 16 + added], reference.labels)
  assert 0 < added < 24 if beta > 0.1 else added == 24  # the threshold filters (or, at 0.1, keeps all)


def test_adanpc_needs_labelled_clean_images():
  model, params, model_state = ref.flax_model()
  config = adanpc.Config(model.apply, num_classes=ref.CLASSES)
  with pytest.raises(ValueError, match="needs labelled clean .*config.clean_images"):
    adanpc.prepare(params, model_state, config, [])
  with pytest.raises(ValueError, match="needs source_features"):
    adanpc.init(params, model_state, config)
