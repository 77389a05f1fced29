"""DoRA-C / convDoRA / CP-DoRA tests: closed forms in numpy + PyTorch conv2d, detached-norm gradient, PEFT's conv DoRA
magnitude init, counts, checkpoint, training."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
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
from tests.adapters.method_checks import TOL, Wrap, check_checkpoint_round_trip, t2n

R, ALPHA = 2, 3.0
S = ALPHA / R
VARIANTS = pytest.mark.parametrize("variant", ["layer_rank", "loralib", "cp"])


def _config(variant, init="default"):
  return AdapterConfig(
      targets="layer/kernel",
      method="conv_dora",
      rank=R,
      alpha=ALPHA,
      init=init,
      fan_in_axes=FAN_IN,
      options={"variant": variant},
  )


def _delta_t(variant, leaves):
  """The variant's update in PyTorch layout (O, I, k, k), computed in numpy from the definitions."""
  if variant == "cp":
    d, c, u, w, lam = (np.asarray(leaves[n], np.float64) for n in ("out", "in", "spatial_0", "spatial_1", "lam"))
    return S * sum(lam[j] * np.einsum("o,i,h,w->oihw", d[:, j], c[:, j], u[:, j], w[:, j]) for j in range(R))
  lora_a, lora_b = np.asarray(leaves["a"], np.float64).T, np.asarray(leaves["b"], np.float64).T
  return S * (lora_b @ lora_a).reshape(C_OUT, C_IN, K, K)


def _setup(variant, seed=1):
  base = conv_base(seed)
  cfg = _config(variant, init="random")
  adapter = reparam.init(jax.random.key(seed + 1), cfg, base)
  adapter["layer"]["kernel"]["m"] = adapter["layer"]["kernel"]["m"] * jnp.linspace(0.5, 2.0, C_OUT)
  return base, adapter, cfg


@VARIANTS
def test_apply_is_dora_closed_form_on_a_torch_conv(variant):
  base, adapter, cfg = _setup(variant)
  leaves = adapter["layer"]["kernel"]
  v = to_torch_layout(base["layer"]["kernel"]) + _delta_t(variant, leaves)
  norm = np.sqrt((v**2).sum(axis=(1, 2, 3)))  # PEFT's conv DoRA norm: per output channel
  w_t = v * (np.asarray(leaves["m"], np.float64) / norm)[:, None, None, None]
  x = images(2)
  np.testing.assert_allclose(
      flax_conv(reparam.apply(base, adapter, cfg), x), torch_conv(w_t, base["layer"]["bias"], x), **TOL
  )
  merged = reparam.merge(base, adapter, cfg)["layer"]["kernel"]
  np.testing.assert_allclose(merged, w_t.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6)


@VARIANTS
def test_init_is_identity_and_magnitude_matches_peft_conv_dora(variant):
  torch.manual_seed(3)
  layer = torch.nn.Conv2d(C_IN, C_OUT, K, padding=1)
  model = peft.get_peft_model(
      Wrap(layer), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["layer"], use_dora=True)
  )
  peft_m = t2n(model.base_model.model.layer.lora_magnitude_vector["default"].weight).reshape(-1)
  base = {
      "layer": {
          "kernel": jnp.asarray(t2n(layer.weight).transpose(2, 3, 1, 0)),
          "bias": jnp.asarray(t2n(layer.bias)),
      }
  }
  cfg = _config(variant)
  adapter = reparam.init(jax.random.key(4), cfg, base)
  np.testing.assert_allclose(adapter["layer"]["kernel"]["m"], peft_m, rtol=1e-6)
  np.testing.assert_allclose(
      reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"], rtol=1e-6, atol=1e-6
  )


def test_gradient_treats_norm_as_constant():
  base, adapter, cfg = _setup("cp")
  c = np.asarray(jax.random.normal(jax.random.key(5), (K, K, C_IN, C_OUT)), np.float64)
  grads = jax.grad(lambda ad: jnp.sum(reparam.apply(base, ad, cfg)["layer"]["kernel"] * c))(adapter)
  leaves = adapter["layer"]["kernel"]
  v = to_torch_layout(base["layer"]["kernel"]) + _delta_t("cp", leaves)
  norm = np.sqrt((v**2).sum(axis=(1, 2, 3)))
  c_t = to_torch_layout(c)
  m = np.asarray(leaves["m"], np.float64)
  np.testing.assert_allclose(grads["layer"]["kernel"]["m"], (v * c_t).sum(axis=(1, 2, 3)) / norm, rtol=1e-5)
  dv = c_t * (m / norm)[:, None, None, None]  # dL/dV with the norm held constant
  d_lam = np.asarray(
      [
          S
          * np.einsum(
              "oihw,o,i,h,w->",
              dv,
              *(np.asarray(leaves[n], np.float64)[:, j] for n in ("out", "in", "spatial_0", "spatial_1")),
          )
          for j in range(R)
      ]
  )
  np.testing.assert_allclose(grads["layer"]["kernel"]["lam"], d_lam, rtol=1e-5, atol=1e-6)


@VARIANTS
def test_count_checkpoint_and_unmerge_refused(variant, tmp_path):
  base, adapter, cfg = _setup(variant)
  inner = {
      "layer_rank": R * K * (C_IN + C_OUT),
      "loralib": R * K * K * (C_IN + C_OUT),
      "cp": R * (2 * K + C_IN + C_OUT + 1),
  }[variant]
  assert param_count(adapter) == inner + C_OUT
  check_checkpoint_round_trip(tmp_path, base, adapter, cfg)
  with pytest.raises(ValueError, match="cannot be unmerged"):
    reparam.unmerge(base, adapter, cfg)


@VARIANTS
def test_training_reduces_loss(variant):
  check_conv_training(_config(variant), conv_base(8))


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="unknown conv LoRA variant"):
    reparam.init(jax.random.key(0), _config("tucker"), conv_base(0))


def test_default_update_is_the_released_lora_c_one():
  """DoRA-C defaults to the released LoRA-C update (loralib ConvLoRA: inner width r k)."""
  cfg = AdapterConfig(targets="layer/kernel", method="conv_dora", rank=R, alpha=ALPHA, fan_in_axes=FAN_IN)
  leaves = reparam.init(jax.random.key(0), cfg, conv_base(0))["layer"]["kernel"]
  assert leaves["a"].shape == (C_IN * K, R * K) and leaves["b"].shape == (R * K, C_OUT * K)
