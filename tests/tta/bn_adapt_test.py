"""BN-adapt and source vs PyTorch BatchNorm (batch statistics / running averages), and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.tta import bn_adapt, source
from tests.tta import torch_reference as ref


def _with_running_stats(model_state):
  rng = np.random.default_rng(3)
  stats = {
      "mean": jnp.asarray(rng.standard_normal(ref.CHANNELS), jnp.float32),
      "var": jnp.asarray(rng.uniform(0.5, 2, ref.CHANNELS), jnp.float32),
  }
  return {"batch_stats": {"bn": stats}}


def test_bn_adapt_and_source_match_torch_batchnorm():
  model, params, model_state = ref.flax_model()
  model_state = _with_running_stats(model_state)
  (images,) = ref.batches(1)
  torch_model = ref.TorchTinyBN(params)
  with torch.no_grad():
    torch_model.bn.running_mean.copy_(torch.tensor(np.asarray(model_state["batch_stats"]["bn"]["mean"])))
    torch_model.bn.running_var.copy_(torch.tensor(np.asarray(model_state["batch_stats"]["bn"]["var"])))
  expected_source = torch_model.eval()(ref.torch_images(images)).detach().numpy()
  expected_bn = ref.configure_like_authors(torch_model)(ref.torch_images(images)).detach().numpy()
  state = bn_adapt.init(params, model_state, bn_adapt.Config(model.apply))
  _, logits = jax.jit(bn_adapt.step)(state, images)
  np.testing.assert_allclose(logits, expected_bn, rtol=2e-5, atol=2e-5)
  _, logits = jax.jit(source.step)(source.init(params, model_state, source.Config(model.apply)), images)
  np.testing.assert_allclose(logits, expected_source, rtol=2e-5, atol=2e-5)


def test_bn_adapt_bad_input():
  model, params, model_state = ref.flax_model()
  state = bn_adapt.init(params, model_state, bn_adapt.Config(model.apply))
  with pytest.raises(ValueError, match="bn_adapt .* at least 2 images; got a batch of 1"):
    bn_adapt.step(state, ref.batches(1, size=1)[0])
  with pytest.raises(ValueError, match="no 'batch_stats'.*export/model_state"):
    bn_adapt.init(params, {}, bn_adapt.Config(model.apply))
