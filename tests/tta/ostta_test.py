"""OSTTA vs a PyTorch transcription of UniEnt's OSTTA (criterion 'ent'), and bad input."""

import copy

import jax
import numpy as np
import optax
import pytest
import torch

from jaxpeft.tta import ostta
from tests.tta import torch_reference as ref


def _torch_step(model0, model, optimizer, images, alpha):
  """forward_and_adapt with criterion='ent', transcribed."""
  x = ref.torch_images(images)
  values0, indices0 = model0(x).softmax(1).max(1)
  outputs = model(x)
  values = outputs.softmax(1)[torch.arange(len(x)), indices0]
  loss = ref.softmax_entropy(outputs)[values >= values0].mean(0)
  mean = outputs.softmax(1).mean(0)
  loss = loss - alpha * -(mean * torch.log(mean)).sum()
  loss.backward()
  optimizer.step()
  optimizer.zero_grad()
  return outputs, int((values >= values0).sum())


@pytest.mark.parametrize("alpha,steps", [(1.0, 1), (0.5, 2)])
def test_ostta_matches_reference(alpha, steps):
  model, params, model_state = ref.flax_model()
  config = ostta.Config(model.apply, optimizer=optax.adam(0.1), diversity=alpha, steps=steps)
  state = ostta.init(params, model_state, config)
  torch_model = ref.configure_like_authors(ref.TorchTinyBN(params))
  torch_model0 = copy.deepcopy(torch_model)
  optimizer = torch.optim.Adam([torch_model.bn.weight, torch_model.bn.bias], lr=0.1)
  step, kept, total = jax.jit(ostta.step), 0, 0
  for images in ref.batches(5):
    state, logits = step(state, images)
    for _ in range(steps):
      outputs, count = _torch_step(torch_model0, torch_model, optimizer, images, alpha)
      kept, total = kept + count, total + len(images)
    np.testing.assert_allclose(logits, outputs.detach().numpy(), rtol=2e-5, atol=2e-5)
    ref.assert_bn_equal(state.params, torch_model, rtol=1e-4, atol=1e-5)
  assert int(state.extra["num_backward"]) == kept
  assert 0 < kept <= total
  if alpha >= 1:  # a strong diversity term lowers confidences after the first batch: the filter drops them
    assert kept < total


def test_ostta_needs_norm_layers():
  model, params, model_state = ref.flax_model()
  with pytest.raises(ValueError, match="ostta: the parameter pattern 'nothing' matches no parameter"):
    ostta.init(params, model_state, ostta.Config(model.apply, pattern="nothing"))
