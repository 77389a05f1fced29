"""UnMix-TNS vs a PyTorch transcription of devavratTomar/unmixtns (UnMixTNS2d), and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxpeft.tta import unmix_tns
from tests.tta import torch_reference as ref


class _TorchUnMixTNS2d(torch.nn.Module):
  """UnMixTNS2d's forward and component update, transcribed; components given (see the init test)."""

  def __init__(self, bn, means, variances, momentum):
    super().__init__()
    self.means, self.vars, self.momentum, self.eps = means, variances, momentum, bn.eps
    self.weight, self.bias = bn.weight, bn.bias

  def forward(self, x):
    inst_mean, inst_var = x.mean((2, 3)), x.var((2, 3), unbiased=False)
    with torch.no_grad():
      probs = torch.softmax(F.normalize(inst_mean, dim=1) @ F.normalize(self.means, dim=1).T / 0.07, 1)
    p = probs.unsqueeze(-1)
    mean_mat = (1 - p) * self.means.unsqueeze(0) + p * inst_mean.unsqueeze(1)
    var_mat = (1 - p) * self.vars.unsqueeze(0) + p * inst_var.unsqueeze(1)
    mean = mean_mat.mean(1)
    var = var_mat.mean(1) + (mean_mat**2).mean(1) - mean_mat.mean(1) ** 2
    with torch.no_grad():
      self.means = self.means + self.momentum * (p * (inst_mean.unsqueeze(1) - self.means.unsqueeze(0))).mean(0)
      self.vars = self.vars + self.momentum * (p * (inst_var.unsqueeze(1) - self.vars.unsqueeze(0))).mean(0)
    b, c = mean.shape
    x = (x - mean.view(b, c, 1, 1)) / torch.sqrt(var.view(b, c, 1, 1) + self.eps)
    return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _model_with_source_stats():
  model, params, _ = ref.flax_model()
  rng = np.random.default_rng(3)
  stats = {"mean": rng.standard_normal(ref.CHANNELS) * 0.3, "var": rng.uniform(0.5, 2, ref.CHANNELS)}
  return model, params, {"batch_stats": {"bn": {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}}}


def test_unmix_tns_init_matches_reference_formula():
  model, params, model_state = _model_with_source_stats()
  k = 4
  state = unmix_tns.init(params, model_state, unmix_tns.Config(model.apply, num_components=k))
  source = {n: np.asarray(v) for n, v in model_state["batch_stats"]["bn"].items()}
  noise = (np.asarray(state.extra["means"]["bn"]) - source["mean"]) / (
      math.sqrt(0.5 * k / (k - 1)) * np.sqrt(source["var"])
  )
  assert abs(noise.std() - 1) < 0.5 and noise.shape == (k, ref.CHANNELS)
  np.testing.assert_allclose(state.extra["vars"]["bn"], np.tile(0.5 * source["var"], (k, 1)), rtol=1e-6)
  single = unmix_tns.init(params, model_state, unmix_tns.Config(model.apply, num_components=1))
  np.testing.assert_allclose(single.extra["means"]["bn"], source["mean"][None], rtol=1e-6)
  np.testing.assert_allclose(single.extra["vars"]["bn"], source["var"][None], rtol=1e-6)


@pytest.mark.parametrize("batch_size", [8, 1])
def test_unmix_tns_matches_reference(batch_size):
  model, params, model_state = _model_with_source_stats()
  state = unmix_tns.init(params, model_state, unmix_tns.Config(model.apply, num_components=4))
  torch_model = ref.TorchTinyBN(params)
  momentum = 1 - 0.9 ** (batch_size / 64)  # replace_bn_layers' batch-size correction of momentum 0.1
  as_torch = lambda x: torch.tensor(np.asarray(x))
  torch_model.bn = _TorchUnMixTNS2d(
      torch_model.bn, as_torch(state.extra["means"]["bn"]), as_torch(state.extra["vars"]["bn"]), momentum
  )
  step = jax.jit(unmix_tns.step)
  for images in ref.batches(3, size=batch_size):
    state, logits = step(state, images + 0.5)
    expected = torch_model(ref.torch_images(images + 0.5)).detach().numpy()
    np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(state.extra["means"]["bn"], torch_model.bn.means.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.extra["vars"]["bn"], torch_model.bn.vars.numpy(), rtol=1e-5, atol=1e-6)
  initial = unmix_tns.init(params, model_state, state.config).extra["means"]["bn"]
  assert not np.allclose(state.extra["means"]["bn"], initial)  # the components moved


def test_unmix_tns_bad_input():
  model, params, _ = ref.flax_model()
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    unmix_tns.init(params, {}, unmix_tns.Config(model.apply))
  with pytest.raises(ValueError, match="num_components=0"):
    unmix_tns.init(params, _model_with_source_stats()[2], unmix_tns.Config(model.apply, num_components=0))
