"""ScaLearn: the combination against a numpy transcription, and recovery of planted scales."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft.merging import scalearn


@pytest.mark.parametrize("normalize", ["none", "mean", "softmax"])
@pytest.mark.parametrize("width", [5, 1])
def test_combine_equals_numpy(normalize, width):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 2, 4, 5)).astype(np.float32)  # (sources, batch, tokens, d)
  omega = rng.uniform(0.2, 1.0, size=(3, width)).astype(np.float32)
  residual = rng.normal(size=(2, 4, 5)).astype(np.float32)
  w = omega
  if normalize == "mean":
    w = omega / omega.sum(0, keepdims=True)
  elif normalize == "softmax":
    w = np.exp(omega) / np.exp(omega).sum(0, keepdims=True)
  want = sum(h[k] * w[k] for k in range(3)) + residual  # (d,) or (1,) broadcasts over the last axis
  got = scalearn.combine([jnp.asarray(x) for x in h], jnp.asarray(omega), jnp.asarray(residual), normalize)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_init_follows_the_reference():
  scales = scalearn.init_scales(jax.random.key(0), 4, 6, ["l0", "l1"], "scalearn")
  assert sorted(scales) == ["l0", "l1"] and scales["l0"].shape == (4, 6)
  np.testing.assert_allclose(scales["l0"], 0.25, atol=5e-3)  # init_scale / K plus N(0, 1e-3)
  shared = scalearn.init_scales(jax.random.key(0), 4, 6, ["l0", "l1"], "scalearn_uniform++", init="value")
  assert list(shared) == [scalearn.SHARED] and shared[scalearn.SHARED].shape == (4, 1)
  assert scalearn.layer_scales(shared, "l1") is shared[scalearn.SHARED]


def _head(h, scales, layers):
  """A two-layer toy: each layer combines its sources' outputs of the previous representation."""
  x = h
  for name, sources in layers.items():
    x = jnp.tanh(scalearn.combine([x @ s for s in sources], scalearn.layer_scales(scales, name), residual=x))
  return x


@pytest.mark.parametrize("variant", ["scalearn", "scalearn_uniform++"])
def test_recovers_planted_scales(variant):
  rng = np.random.default_rng(1)
  d, k = 6, 3
  layers = {
      f"l{i}": [jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32) for _ in range(k)] for i in range(2)
  }
  init = scalearn.init_scales(jax.random.key(0), k, d, list(layers), variant)
  planted = {name: jnp.asarray(rng.uniform(-0.8, 0.8, size=s.shape), jnp.float32) for name, s in init.items()}
  x = jnp.asarray(rng.normal(size=(128, d)), jnp.float32)
  batch = (x, _head(x, planted, layers))
  loss = lambda scales, b: jnp.mean((_head(b[0], scales, layers) - b[1]) ** 2)
  learned = scalearn.fit(init, loss, [batch] * 600, optax.adam(0.03))
  assert float(loss(learned, batch)) < 1e-6
  for name in planted:
    np.testing.assert_allclose(learned[name], planted[name], atol=2e-2)


def test_bad_scales_shape_is_an_error():
  with pytest.raises(ValueError, match="scales must have shape"):
    scalearn.combine([jnp.ones((2, 5))] * 3, jnp.ones((2, 5)))
