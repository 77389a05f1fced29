"""(IA)^3: row/column rescaling in closed form, unmerge, and parity with Hugging Face PEFT's ``IA3Config``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import method_checks as mc


def _cfg(feedforward, targets="layer/kernel", **kw):
  return AdapterConfig(targets=targets, method="ia3", options={"feedforward": ".*" if feedforward else None}, **kw)


@pytest.mark.parametrize("feedforward", [False, True])
def test_closed_form_merge_unmerge_and_count(feedforward):
  base = mc.dense_params(6, 5)
  cfg = _cfg(feedforward, init="random")
  adapter = reparam.init(jax.random.key(1), cfg, base)
  l = np.asarray(adapter["layer"]["kernel"]["l"], np.float64)
  w = np.asarray(base["layer"]["kernel"], np.float64)
  expect = np.diag(l) @ w if feedforward else w @ np.diag(l)
  np.testing.assert_allclose(reparam.apply(base, adapter, cfg)["layer"]["kernel"], expect, atol=1e-6)
  mc.check_merge_unmerge(base, adapter, cfg)
  assert mc.trainable_count(adapter, cfg) == (6 if feedforward else 5)


def test_conv_feedforward_scales_input_channels_over_the_window():
  w = np.asarray(jax.random.normal(jax.random.key(0), (3, 3, 4, 2)))
  cfg = AdapterConfig(
      targets="kernel",
      method="ia3",
      init="random",
      fan_in_axes={"kernel": 3},
      options={"feedforward": "kernel", "spatial_axes": 2},
  )
  adapter = reparam.init(jax.random.key(1), cfg, {"kernel": jnp.asarray(w)})
  l = np.asarray(adapter["kernel"]["l"])
  assert l.shape == (4,)
  np.testing.assert_allclose(
      reparam.apply({"kernel": jnp.asarray(w)}, adapter, cfg)["kernel"], w * l[None, None, :, None], rtol=1e-6
  )


def test_default_init_is_identity_training_checkpoint_and_factored(tmp_path):
  base = mc.dense_params(6, 5)
  cfg = _cfg(False)
  adapter = reparam.init(jax.random.key(1), cfg, base)
  np.testing.assert_array_equal(reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"])
  mc.check_training_reduces_loss(cfg, base)
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)
  x = jnp.linspace(-1, 1, 18).reshape(3, 6)
  for ff in (False, True):
    c = _cfg(ff, targets="kernel", init="random")
    ad = reparam.init(jax.random.key(2), c, base["layer"])
    with factored.intercept(base["layer"], ad, c):
      hooked = nn.Dense(5).apply({"params": base["layer"]}, x)
    np.testing.assert_allclose(
        hooked, nn.Dense(5).apply({"params": reparam.apply(base["layer"], ad, c)}, x), atol=1e-5
    )


def _peft_ia3(layer, feedforward):
  torch.manual_seed(0)
  config = peft.IA3Config(
      target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [], init_ia3_weights=False
  )
  model = peft.get_peft_model(mc.Wrap(layer), config)
  model.eval()
  return model, model.base_model.model.layer


BOTH = pytest.mark.parametrize("feedforward,bias", [(ff, b) for ff in (False, True) for b in (False, True)])


@BOTH
def test_linear_parity_with_peft(feedforward, bias):
  """Output mode rescales the bias too (PEFT: ``l * (x W + b)``), before and after merge."""
  torch.manual_seed(1)
  model, layer = _peft_ia3(torch.nn.Linear(6, 5, bias=bias), feedforward)
  adapter = {"kernel": {"l": jnp.asarray(mc.t2n(layer.ia3_l["default"]).reshape(-1))}}
  cfg = _cfg(feedforward, targets="kernel")
  assert mc.check_linear_parity(model, mc.linear_params(layer), adapter, cfg, 6) < 1e-5


@BOTH
def test_conv2d_parity_with_peft(feedforward, bias):
  torch.manual_seed(2)
  model, layer = _peft_ia3(torch.nn.Conv2d(3, 4, 3, padding=1, bias=bias), feedforward)
  adapter = {"kernel": {"l": jnp.asarray(mc.t2n(layer.ia3_l["default"]).reshape(-1))}}
  cfg = AdapterConfig(
      targets="kernel",
      method="ia3",
      fan_in_axes={"kernel": 3},
      options={"feedforward": "kernel" if feedforward else None, "spatial_axes": 2},
  )
  assert mc.check_conv_parity(model, mc.conv_params(layer), adapter, cfg, 3) < 1e-5


def test_bias_closed_form_on_stacked_dense_general_bfloat16():
  """Output mode: bias' = l * bias per stacked layer, the (heads, head_dim) bias folded, cast back once."""
  rng = np.random.default_rng(0)
  base = {
      "layer": {
          "kernel": jnp.asarray(rng.normal(size=(2, 4, 3, 2)), jnp.bfloat16),
          "bias": jnp.asarray(rng.normal(size=(2, 3, 2)), jnp.bfloat16),
      }
  }
  cfg = _cfg(False, init="random", stacked_axes={"layer/.*": 1}, fan_in_axes={"layer/kernel": 1})
  adapter = reparam.init(jax.random.key(1), cfg, base)
  l = np.asarray(adapter["layer"]["kernel"]["l"])
  assert l.shape == (2, 6)
  expect = l * np.asarray(base["layer"]["bias"], np.float32).reshape(2, 6)
  merged = reparam.merge(base, adapter, cfg)["layer"]["bias"]
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(merged, np.float32).reshape(2, 6), expect, rtol=2**-8)


@pytest.mark.parametrize("feedforward", [False, True])
def test_bias_unmerge_and_feedforward_leaves_bias(feedforward):
  base = mc.dense_params(6, 5)
  cfg = _cfg(feedforward, init="random")
  adapter = reparam.init(jax.random.key(1), cfg, base)
  merged = reparam.merge(base, adapter, cfg)
  l = np.asarray(adapter["layer"]["kernel"]["l"])
  bias = np.asarray(base["layer"]["bias"])
  np.testing.assert_allclose(merged["layer"]["bias"], bias if feedforward else l * bias, rtol=1e-6)
  np.testing.assert_allclose(reparam.unmerge(merged, adapter, cfg)["layer"]["bias"], bias, rtol=1e-5, atol=1e-7)


def test_init_matches_peft():
  for feedforward, size in ((False, 7), (True, 9)):
    layer = peft.get_peft_model(
        mc.Wrap(torch.nn.Linear(9, 7)),
        peft.IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else []),
    ).base_model.model.layer
    theirs = mc.t2n(layer.ia3_l["default"]).reshape(-1)
    ours = reparam.init(jax.random.key(0), _cfg(feedforward, targets="kernel"), {"kernel": jnp.zeros((9, 7))})
    assert theirs.shape == ours["kernel"]["l"].shape == (size,)
    np.testing.assert_array_equal(theirs, 1.0)
    np.testing.assert_array_equal(ours["kernel"]["l"], 1.0)
