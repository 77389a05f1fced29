"""Tent vs a PyTorch transcription of DequanWang/tent (same weights, same batches), and bad input."""

import jax
import numpy as np
import optax
import pytest
import torch

from jaxpeft.models.cnn import CNN
from jaxpeft.tta import tent
from tests.tta import torch_reference as ref


@pytest.mark.parametrize("steps", [1, 3])
def test_tent_matches_reference(steps):
  model, params, model_state = ref.flax_model()
  state = tent.init(params, model_state, tent.Config(model.apply, optimizer=optax.adam(1e-2), steps=steps))
  torch_model = ref.configure_like_authors(ref.TorchTinyBN(params))
  optimizer = torch.optim.Adam([torch_model.bn.weight, torch_model.bn.bias], lr=1e-2)
  step = jax.jit(tent.step)
  for images in ref.batches(3):
    state, logits = step(state, images)
    for _ in range(steps):  # forward_and_adapt: loss on this forward, backward, step, zero_grad
      outputs = torch_model(ref.torch_images(images))
      ref.softmax_entropy(outputs).mean(0).backward()
      optimizer.step()
      optimizer.zero_grad()
    np.testing.assert_allclose(logits, outputs.detach().numpy(), rtol=2e-5, atol=2e-5)
    ref.assert_bn_equal(state.params, torch_model)
  assert not np.allclose(state.params["bn"]["scale"], params["bn"]["scale"])  # it did adapt


def test_tent_needs_norm_layers():
  model = CNN(num_classes=3, features=(4,), hidden=8)
  params = model.init(jax.random.key(0), np.zeros((1, 6, 6, 1)))["params"]
  with pytest.raises(ValueError, match="tent: the parameter pattern .* matches no parameter .*conv_0/kernel"):
    tent.init(params, {}, tent.Config(model.apply))
