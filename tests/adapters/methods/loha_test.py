"""LoHa: closed form, inits and parity with Hugging Face PEFT's ``LoHaConfig`` (Linear and Conv2d)."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import method_checks as mc

R, ALPHA = 3, 5.0
CFG = AdapterConfig(targets="layer/kernel", method="loha", rank=R, alpha=ALPHA, init="random")


def test_closed_form_merge_unmerge_and_count():
  base = mc.dense_params(6, 5)
  adapter = reparam.init(jax.random.key(1), CFG, base)
  a1, b1, a2, b2 = (np.asarray(adapter["layer"]["kernel"][k], np.float64) for k in ("a1", "b1", "a2", "b2"))
  expect = np.asarray(base["layer"]["kernel"], np.float64) + ALPHA / R * (a1 @ b1) * (a2 @ b2)
  np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], expect, atol=1e-6)
  assert np.linalg.matrix_rank(expect - np.asarray(base["layer"]["kernel"])) > R  # Hadamard: rank up to r^2
  mc.check_merge_unmerge(base, adapter, CFG)
  assert mc.trainable_count(adapter, CFG) == 2 * R * (6 + 5)


def test_default_init_is_identity_training_and_checkpoint(tmp_path):
  base = mc.dense_params(6, 5)
  cfg = AdapterConfig(targets="layer/kernel", method="loha", rank=R, alpha=ALPHA)
  adapter = reparam.init(jax.random.key(1), cfg, base)
  np.testing.assert_array_equal(reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"])
  mc.check_training_reduces_loss(cfg, base)
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)


def _peft_loha(layer, init_weights=False):
  torch.manual_seed(0)
  config = peft.LoHaConfig(r=R, alpha=ALPHA, target_modules=["layer"], init_weights=init_weights)
  model = peft.get_peft_model(mc.Wrap(layer), config)
  model.eval()
  return model, model.base_model.model.layer


def _factor(p, conv_shape=None):
  """PEFT ``hada_w*_b (r, d_in)`` -> our ``a (d_in, r)``; conv: torch (c_in, kh, kw) order -> Flax fold."""
  p = mc.t2n(p)
  if conv_shape is not None:
    p = p.reshape(R, *conv_shape).transpose(2, 3, 1, 0).reshape(-1, R)
  else:
    p = p.T
  return jnp.asarray(p)


def _adapter(layer, conv_shape=None):
  g = lambda name: getattr(layer, name)["default"]  # noqa: E731
  return {
      "kernel": {
          "a1": _factor(g("hada_w1_b"), conv_shape),
          "b1": jnp.asarray(mc.t2n(g("hada_w1_a")).T),
          "a2": _factor(g("hada_w2_b"), conv_shape),
          "b2": jnp.asarray(mc.t2n(g("hada_w2_a")).T),
      }
  }


def test_linear_parity_with_peft():
  torch.manual_seed(1)
  model, layer = _peft_loha(torch.nn.Linear(6, 5))
  cfg = AdapterConfig(targets="kernel", method="loha", rank=R, alpha=ALPHA)
  assert mc.check_linear_parity(model, mc.linear_params(layer), _adapter(layer), cfg, 6) < 1e-5


def test_conv2d_parity_with_peft():
  torch.manual_seed(2)
  model, layer = _peft_loha(torch.nn.Conv2d(3, 4, 3, padding=1))
  assert "default" not in layer.hada_t1  # PEFT default: no effective-conv (Tucker) core
  cfg = AdapterConfig(targets="kernel", method="loha", rank=R, alpha=ALPHA, fan_in_axes={"kernel": 3})
  assert mc.check_conv_parity(model, mc.conv_params(layer), _adapter(layer, (3, 3, 3)), cfg, 3) < 1e-5


@pytest.mark.parametrize("conv", [False, True])
def test_init_distributions_match_peft(conv):
  r = 32
  torch.manual_seed(3)
  base_layer = torch.nn.Conv2d(64, 128, 3) if conv else torch.nn.Linear(576, 128)
  config = peft.LoHaConfig(r=r, alpha=8, target_modules=["layer"])
  layer = peft.get_peft_model(mc.Wrap(base_layer), config).base_model.model.layer
  shape = (3, 3, 64, 128) if conv else (576, 128)
  cfg = AdapterConfig(targets="kernel", method="loha", rank=r, alpha=8, fan_in_axes={"kernel": 3} if conv else {})
  ours = reparam.init(jax.random.key(3), cfg, {"kernel": jnp.zeros(shape)})["kernel"]
  np.testing.assert_array_equal(mc.t2n(layer.hada_w2_b["default"]), 0.0)
  np.testing.assert_array_equal(ours["a2"], 0.0)
  d_in = 576  # = 64 * 3 * 3 for the conv: PyTorch's fan-in of hada_w*_b
  pairs = [
      (layer.hada_w1_b["default"], ours["a1"], d_in),
      (layer.hada_w1_a["default"], ours["b1"], r),
      (layer.hada_w2_a["default"], ours["b2"], r),
  ]
  for theirs, mine, fan_in in pairs:
    theirs, mine = mc.t2n(theirs), np.asarray(mine)
    assert theirs.size == mine.size
    bound = 1 / np.sqrt(fan_in)
    for m in (theirs, mine):
      assert np.abs(m).max() <= bound and np.abs(m).max() > 0.98 * bound
      np.testing.assert_allclose(m.std(), bound / np.sqrt(3), rtol=0.05)
