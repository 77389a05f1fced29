"""Merging into quantized bases: dequantize, merge in float32 (checked against a numpy float64 LoRA merge),
re-quantize within the format's bound of the merged weight; bf16 option; untouched leaves stay as they were."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import quantize
from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig

D = 64
BASE = {
    "a": {"kernel": 0.02 * jax.random.normal(jax.random.key(0), (D, D))},
    "b": {"kernel": 0.02 * jax.random.normal(jax.random.key(1), (D, D))},
}
CONFIG = AdapterConfig(targets="a/kernel", rank=4, alpha=8.0)
ADAPTER = {
    "a": {
        "kernel": {
            "a": jax.random.normal(jax.random.key(2), (D, 4)) / 8,
            "b": 0.01 * jax.random.normal(jax.random.key(3), (4, D)),
        }
    }
}


def _numpy_merge(qbase):
  w = np.asarray(qbase["a"]["kernel"].dequantize(), np.float64)
  a, b = (np.asarray(ADAPTER["a"]["kernel"][k], np.float64) for k in "ab")
  return w + 2.0 * a @ b


@pytest.mark.parametrize(
    "fmt, double_quant, half_gap, group",
    [
        ("nf4", False, (1 - 0.6961928) / 2, "block"),
        ("nf4", True, (1 - 0.6961928) / 2, "block"),
        ("int4", False, 1 / 14, "block"),
        ("int8", False, 1 / 254, "channel"),
    ],
)
def test_requantized_merge_within_bound(fmt, double_quant, half_gap, group):
  qbase = quantize.quantize_tree(BASE, ".*kernel", fmt, 32, double_quant)
  want = _numpy_merge(qbase)
  merged = quantize.merge(qbase, ADAPTER, CONFIG)
  assert quantize.is_quantized(merged["a"]["kernel"]) and merged["a"]["kernel"].fmt == fmt
  assert merged["b"]["kernel"] is qbase["b"]["kernel"]  # not targeted: not re-rounded
  np.testing.assert_allclose(
      np.asarray(quantize.merge(qbase, ADAPTER, CONFIG, keep="float32")["a"]["kernel"]), want, rtol=1e-5, atol=1e-7
  )
  got = np.asarray(merged["a"]["kernel"].dequantize(), np.float64)
  absmax = (
      np.repeat(np.abs(want.reshape(-1, 32)).max(1), 32).reshape(want.shape)
      if group == "block"
      else np.abs(want).max(0, keepdims=True)
  )
  # double quantization: |a - a~| <= 0.00703 * max_b |a_b - mean a| <= 0.00703 * max_b a_b (one group of 256)
  extra = 0.00703 * absmax.max() if double_quant else 0.0
  assert np.all(np.abs(got - want) <= half_gap * absmax + extra + 1e-7)
  errors = quantize.merge_error(qbase, ADAPTER, CONFIG, float_params=BASE)
  assert errors["requantized"]["max_abs"] == pytest.approx(np.abs(got - want).max(), rel=1e-3)
  assert errors["requantized_vs_float_base"]["max_abs"] > 0


def test_keep_bfloat16():
  qbase = quantize.quantize_tree(BASE, ".*kernel", "nf4", 32)
  merged = quantize.merge(qbase, ADAPTER, CONFIG, keep="bfloat16")
  assert merged["a"]["kernel"].dtype == jnp.bfloat16
  want = _numpy_merge(qbase)
  assert np.all(np.abs(np.asarray(merged["a"]["kernel"], np.float64) - want) <= 2.0**-8 * np.abs(want) + 1e-12)


def test_merge_needs_a_quantized_base():
  with pytest.raises(ValueError, match="expects a base with QuantizedArray leaves"):
    quantize.merge(BASE, ADAPTER, CONFIG)
  with pytest.raises(ValueError, match="keep='int2'"):
    quantize.merge(quantize.quantize_tree(BASE, ".*kernel", "nf4", 32), ADAPTER, CONFIG, keep="int2")


def test_int8_requantization_keeps_the_scale_axes():
  base = {"a": {"kernel": jax.random.normal(jax.random.key(5), (2, 32, 16))}}
  config = AdapterConfig(targets="a/kernel", rank=2, alpha=2.0, init="random", stacked_axes={"a/.*": 1})
  adapter = reparam.init(jax.random.key(6), config, base)
  qbase = {"a": {"kernel": quantize.quantize_array(base["a"]["kernel"], "int8", reduce_axes=(1,))}}
  merged = quantize.merge(qbase, adapter, config)["a"]["kernel"]
  assert merged.scales.shape == (2, 1, 16)
  exact = np.asarray(quantize.merge(qbase, adapter, config, keep="float32")["a"]["kernel"], np.float64)
  np.testing.assert_allclose(np.asarray(merged.scales), np.abs(exact).max(axis=1, keepdims=True) / 127, rtol=1e-6)
