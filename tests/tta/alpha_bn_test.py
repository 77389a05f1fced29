"""alpha-BN vs a numpy transcription of the reference's AlphaBatchNorm, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.tta import alpha_bn
from tests.tta import torch_reference as ref


@pytest.mark.parametrize("alpha", [0.1, 0.7])
def test_alpha_bn_matches_numpy_transcription(alpha):
  model, params, _ = ref.flax_model()
  rng = np.random.default_rng(3)
  source_mean, source_var = rng.standard_normal(ref.CHANNELS), rng.uniform(0.5, 2, ref.CHANNELS)
  stats = {"mean": jnp.asarray(source_mean, jnp.float32), "var": jnp.asarray(source_var, jnp.float32)}
  model_state = {"batch_stats": {"bn": stats}}
  (images,) = ref.batches(1)

  def mixed(h):  # the reference's momentum-1 BatchNorm keeps the unbiased batch variance
    flat = h.reshape(-1, h.shape[-1])
    return (1 - alpha) * source_mean + alpha * flat.mean(0), (1 - alpha) * source_var + alpha * flat.var(0, ddof=1)

  state = alpha_bn.init(params, model_state, alpha_bn.Config(model.apply, alpha=alpha))
  _, logits = jax.jit(alpha_bn.step)(state, images)
  np.testing.assert_allclose(logits, ref.numpy_tiny_bn(params, images, mixed), rtol=1e-5, atol=1e-5)


def test_alpha_bn_bad_input():
  model, params, model_state = ref.flax_model()
  with pytest.raises(ValueError, match="alpha=1.5 weighs .* in \\[0, 1\\]"):
    alpha_bn.init(params, model_state, alpha_bn.Config(model.apply, alpha=1.5))
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    alpha_bn.init(params, {}, alpha_bn.Config(model.apply))
  state = alpha_bn.init(params, model_state, alpha_bn.Config(model.apply))
  with pytest.raises(ValueError, match="alpha_bn .* got a batch of 1"):
    alpha_bn.step(state, ref.batches(1, size=1)[0])
