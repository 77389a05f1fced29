"""Low-precision merges: errors within the closed-form rounding bounds (half a bf16 ulp / half an int8 step)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.low_precision_merge import merge_error, merge_int8, quantize_int8
from jaxpeft.quantize import QuantizedArray, dequantize_tree
from tests.adapters import tiny_models as tm

BASE = tm.init_params(tm.TinyTransformer(), tm.tokens())
SCANNED = tm.init_params(tm.ScannedMLP(), jnp.ones((2, tm.WIDTH)))
CFG = AdapterConfig(
    targets=r"(dense|out)/kernel", rank=2, alpha=4.0, init="random", fan_in_axes=tm.ATTENTION_FAN_IN
)
SCANNED_CFG = AdapterConfig(
    targets=r"layers/dense/kernel", rank=2, alpha=4.0, init="random", stacked_axes={r"layers/.*": 1}
)


def _scaled(adapter, factor):
  return jax.tree.map(lambda x: factor * x, adapter)


def _exact(base, adapter, config, path):
  """W + ΔW in float64 from numpy (ΔW = s a b per layer)."""
  kernel = np.asarray(base[path[0]][path[1]], np.float64)
  leaves = adapter[path[0]][path[1]]
  a, b = np.asarray(leaves["a"], np.float64), np.asarray(leaves["b"], np.float64)
  delta = config.alpha / config.rank * np.matmul(a, b)
  return kernel + delta.reshape(kernel.shape)


def test_bf16_merge_within_half_ulp():
  adapter = _scaled(reparam.init(jax.random.key(0), CFG, BASE), 0.5)
  base_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), BASE)
  merged = reparam.merge(base_bf16, adapter, CFG)
  for path in [("dense", "kernel"), ("out", "kernel")]:
    got = np.asarray(merged[path[0]][path[1]])
    assert got.dtype == ml_dtypes.bfloat16
    exact = _exact(jax.tree.map(lambda x: x.astype(jnp.float32), base_bf16), adapter, CFG, path)
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 8)
    # f32 rounding of W + ΔW before the bf16 rounding adds at most 2^-24 |v|.
    assert np.all(np.abs(got.astype(np.float64) - exact) <= half_ulp + 2.0**-24 * np.abs(exact))
    # The bound is tight: some entries use more than a quarter of it (the test can fail).
    assert np.any(np.abs(got.astype(np.float64) - exact) > 0.25 * half_ulp)


@pytest.mark.parametrize("base,config", [(BASE, CFG), (SCANNED, SCANNED_CFG)])
def test_int8_quantizer_and_merge_within_half_step(base, config):
  adapter = reparam.init(jax.random.key(1), config, base)
  quantized = quantize_int8(base, config)
  path = ("dense", "kernel") if config is CFG else ("layers", "dense", "kernel")

  def leaf(tree):
    for part in path:
      tree = tree[part]
    return tree

  q = leaf(quantized)
  assert isinstance(q, QuantizedArray) and q.fmt == "int8" and q.codes.dtype == jnp.int8
  assert np.abs(np.asarray(q.codes)).max() == 127
  # per output channel of each layer: the fan-in axis is reduced
  assert q.scales.shape == leaf(base).shape[:-2] + (1, leaf(base).shape[-1])
  w = np.asarray(leaf(base), np.float64)
  scale = np.abs(w).max(axis=-2, keepdims=True) / 127
  np.testing.assert_allclose(np.asarray(q.scales), scale, rtol=1e-6)
  assert np.all(np.abs(np.asarray(q.dequantize(), np.float64) - w) <= scale / 2 * (1 + 1e-5))

  merged = leaf(merge_int8(quantized, adapter, config))
  exact = np.asarray(leaf(reparam.merge(dequantize_tree(quantized), adapter, config)), np.float64)
  new_scale = np.abs(exact).max(axis=-2, keepdims=True) / 127
  err = np.abs(np.asarray(merged.dequantize(), np.float64) - exact)
  assert np.all(err <= new_scale / 2 * (1 + 1e-5))
  assert np.any(err > 0.25 * new_scale)


def test_merge_error_report_is_consistent_with_bounds():
  adapter = reparam.init(jax.random.key(2), CFG, BASE)
  errors = merge_error(BASE, adapter, CFG)
  assert errors["bf16"]["max_rel"] <= 2.0**-8 * (1 + 1e-6)
  assert errors["int8_vs_float_base"]["max_abs"] >= errors["int8"]["max_abs"] > 0
  assert 0 < errors["bf16"]["rel_fro"] < errors["int8"]["rel_fro"]


def test_merge_int8_refuses_float_base():
  with pytest.raises(ValueError, match="quantize_int8"):
    merge_int8(BASE, reparam.init(jax.random.key(0), CFG, BASE), CFG)
