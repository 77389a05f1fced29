"""LoRA-C / convLoRA tests: parity with loralib's ConvLoRA (PyTorch), an independent torch conv, inits, counts."""

import jax
import jax.numpy as jnp
import loralib
import numpy as np
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from tests.adapters.conv_checks import (
    C_IN,
    C_OUT,
    FAN_IN,
    K,
    check_conv_training,
    conv_base,
    flax_conv,
    images,
    to_torch_layout,
    torch_conv,
)
from tests.adapters.method_checks import TOL, check_checkpoint_round_trip, check_merge_unmerge, t2n

R, ALPHA = 2, 3.0


def _config(variant=None, init="default"):
  """``variant=None``: the default."""
  return AdapterConfig(
      targets="layer/kernel",
      method="conv_lora",
      rank=R,
      alpha=ALPHA,
      init=init,
      fan_in_axes=FAN_IN,
      options={} if variant is None else {"variant": variant},
  )


def _loralib_conv(seed):
  torch.manual_seed(seed)
  conv = loralib.Conv2d(C_IN, C_OUT, K, r=R, lora_alpha=ALPHA, padding=1)
  torch.nn.init.normal_(conv.lora_B)  # move B off zero so the update matters
  return conv


def _from_loralib(conv):
  params = {
      "layer": {
          "kernel": jnp.asarray(t2n(conv.conv.weight).transpose(2, 3, 1, 0)),
          "bias": jnp.asarray(t2n(conv.conv.bias)),
      }
  }
  adapter = {"layer": {"kernel": {"a": jnp.asarray(t2n(conv.lora_A).T), "b": jnp.asarray(t2n(conv.lora_B).T)}}}
  return params, adapter


def test_default_is_the_released_lora_c_code_loralib_conv_lora_before_and_after_merge():
  """alexyyds2024/lora-C (loralib/layers.py) and aleemsidra/ConvLoRA vendor loralib's ConvLoRA unchanged."""
  conv = _loralib_conv(0)
  params, adapter = _from_loralib(conv)
  cfg = _config()
  assert reparam.init(jax.random.key(0), cfg, params)["layer"]["kernel"]["a"].shape == (C_IN * K, R * K)
  x = images(1)
  expect = t2n(conv(torch.from_numpy(x.transpose(0, 3, 1, 2)))).transpose(0, 2, 3, 1)
  ours = flax_conv(reparam.apply(params, adapter, cfg), x)
  np.testing.assert_allclose(ours, expect, **TOL)
  assert not np.allclose(expect, flax_conv(params, x), atol=1e-3)  # the adapter matters
  conv.eval()  # loralib merges the update into conv.weight
  merged = reparam.merge(params, adapter, cfg)
  np.testing.assert_allclose(merged["layer"]["kernel"], t2n(conv.conv.weight).transpose(2, 3, 1, 0), **TOL)


@pytest.mark.parametrize("variant", ["layer_rank", "loralib"])
def test_update_is_loralib_view_of_b_a(variant):
  """Independent computation in PyTorch layout: Delta W_t = s * (B A).view(O, I, k, k), then torch conv2d."""
  base = conv_base(1)
  cfg = _config(variant, init="random")
  adapter = reparam.init(jax.random.key(2), cfg, base)
  a = np.asarray(adapter["layer"]["kernel"]["a"], np.float64)
  b = np.asarray(adapter["layer"]["kernel"]["b"], np.float64)
  q = R * (K if variant == "loralib" else 1)
  assert a.shape == (C_IN * K, q) and b.shape == (q, C_OUT * K)
  lora_a, lora_b = a.T, b.T  # loralib layout: lora_A (q, I k), lora_B (O k, q)
  w_t = to_torch_layout(base["layer"]["kernel"]) + (ALPHA / R) * (lora_b @ lora_a).reshape(C_OUT, C_IN, K, K)
  x = images(2)
  ours = flax_conv(reparam.apply(base, adapter, cfg), x)
  np.testing.assert_allclose(ours, torch_conv(w_t, base["layer"]["bias"], x), **TOL)


@pytest.mark.parametrize("variant", ["layer_rank", "loralib"])
def test_merge_unmerge_count_and_checkpoint(variant, tmp_path):
  base = conv_base(3)
  cfg = _config(variant, init="random")
  adapter = reparam.init(jax.random.key(4), cfg, base)
  check_merge_unmerge(base, adapter, cfg)
  q = R * (K if variant == "loralib" else 1)
  assert param_count(adapter) == q * K * (C_IN + C_OUT)  # r k (I + O)  or  r k^2 (I + O)
  check_checkpoint_round_trip(tmp_path, base, adapter, cfg)


@pytest.mark.parametrize("variant", ["layer_rank", "loralib"])
def test_default_init_is_identity_and_matches_loralib_bounds(variant):
  c_in, c_out = 256, 8  # fan-in I k = 768 -> 768 * q draws of a
  base = conv_base(5, c_in=c_in, c_out=c_out)
  cfg = _config(variant)
  adapter = reparam.init(jax.random.key(6), cfg, base)["layer"]["kernel"]
  np.testing.assert_array_equal(
      reparam.apply(base, {"layer": {"kernel": adapter}}, cfg)["layer"]["kernel"], base["layer"]["kernel"]
  )
  torch.manual_seed(6)
  ref = loralib.Conv2d(c_in, c_out, K, r=R, lora_alpha=ALPHA)
  ref_a = t2n(ref.lora_A)
  bound = 1 / np.sqrt(c_in * K)  # kaiming_uniform_(a=sqrt(5)) on lora_A, fan-in I k
  a = np.asarray(adapter["a"])
  np.testing.assert_array_equal(adapter["b"], 0.0)
  np.testing.assert_array_equal(t2n(ref.lora_B), 0.0)
  assert np.abs(ref_a).max() <= bound and np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.98 * bound
  np.testing.assert_allclose(ref_a.std(), bound / np.sqrt(3), rtol=0.05)
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.06)  # >= 1536 draws: ~5 standard errors


@pytest.mark.parametrize("variant", ["layer_rank", "loralib"])
def test_training_reduces_loss(variant):
  check_conv_training(_config(variant), conv_base(8))


def test_bad_inputs_are_refused():
  base = conv_base(0)
  with pytest.raises(ValueError, match="unknown conv LoRA variant"):
    reparam.init(jax.random.key(0), _config("kernelwise"), base)
  with pytest.raises(ValueError, match="square 2-D conv kernels"):
    reparam.init(jax.random.key(0), _config("layer_rank"), {"layer": {"kernel": jnp.zeros((3, 1, 2, 4))}})
  with pytest.raises(ValueError, match="fan_in_axes=3"):
    reparam.init(
        jax.random.key(0),
        AdapterConfig(targets="layer/kernel", method="conv_lora"),
        {"layer": {"kernel": jnp.zeros((6, 4))}},
    )


def test_pre_rename_variant_names_are_refused_with_their_new_name():
  with pytest.raises(ValueError, match="Variant 'lora_c' was renamed 'layer_rank'"):
    reparam.init(jax.random.key(0), _config("lora_c"), conv_base(1))
