"""Merging adapters into low-precision bases: bfloat16, and a small symmetric int8 quantizer.

Every merge here is dequantize -> add the update in float32 -> re-quantize once, which is what users of
quantized LoRA bases converge on (Hugging Face PEFT merges into bitsandbytes 4/8-bit weights the same way and
warns about the rounding; huggingface/peft#2321, #2105).

bfloat16 bases: ``reparam.merge`` already does it -- each targeted leaf is cast to float32, ``W + ΔW`` is formed
in float32 and rounded to bfloat16 once -- so there is no separate bf16 function. The rounding error of one
entry ``v = W + ΔW`` is at most half a bfloat16 ulp (8 significant bits, round to nearest even)::

    |bf16(v) - v| <= 2^(floor(log2 |v|) - 8)   (<= 2^-8 |v|, relative)

int8 bases (``quantize_int8`` / ``merge_int8``): ``jaxpeft.quantize``'s int8 ``QuantizedArray`` (dequantize with
``jaxpeft.quantize.dequantize_tree``) with one scale per output channel of each layer's folded ``(d_in, d_out)``
kernel (the target's fan-in axes reduced, stacked layer axes kept), zero point 0::

    scale_j = max_i |W_ij| / 127,   q_ij = clip(round(W_ij / scale_j), -127, 127),   W~_ij = scale_j q_ij

so ``|W~_ij - W_ij| <= scale_j / 2`` (half a quantization step). ``merge_int8`` dequantizes, adds ``ΔW`` in
float32 and re-quantizes with fresh scales ``scale'_j`` of ``W~ + ΔW``: its error against the float32 merge of
the dequantized base is ``<= scale'_j / 2``, and against the float32 merge of the original float base
``<= scale_j / 2 + scale'_j / 2``. This quantizer is the simple reference one (no groups, no outlier handling);
training on quantized bases and 4-bit formats: ``jaxpeft.quantize``.

Measured (``merge_error``, with ``jaxpeft.adapters.merge_errors.max_errors``: max abs error, max elementwise
relative error, Frobenius-relative error; one
1024 x 1024 kernel W ~ N(0, 0.02^2), a rank-16 LoRA update with entries of std 2e-3, about 10% of W; CPU,
jax 0.10.2), command::

    python -c "from jaxpeft.adapters.low_precision_merge import measure_example; print(measure_example())"

                                                             max abs  max rel                Frobenius rel
    bf16 merge vs float32 merge of the same bf16 base        2.4e-4   3.9e-3 (= 2^-8 bound)  1.7e-3
    bf16 merge vs float32 merge of the float32 base          4.7e-4   (near-zero entries)    2.3e-3
    naive bf16 (ΔW rounded to bf16, then added in bf16)      2.6e-4   1.0                    1.7e-3
    int8 merge vs float32 merge of the dequantized base      3.8e-4   (near-zero entries)    7.9e-3
    int8 (quantized base + merge) vs float32 merge of W      7.5e-4   (near-zero entries)    1.1e-2

The int8 max abs error is half a quantization step of the widest channel (max_i |v_ij| ~ 0.1, step ~ 7.7e-4).
Elementwise relative errors are unbounded where the exact value is near zero (int8 rounds small entries to
0), so only the bf16-vs-same-base row has a relative bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft import quantize
from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.merge_errors import max_errors
from jaxpeft.adapters.reparam import AdapterParams, Params
from jaxpeft.adapters.selection import path_string, select_targets


def quantize_int8(params: Params, config: AdapterConfig) -> Params:
  """``params`` with the leaves targeted by ``config`` replaced by per-output-channel int8 ``QuantizedArray``s."""
  targets = {t.path: t for t in select_targets(config, params)}

  def convert(key_path, leaf):
    target = targets.get(path_string(key_path))
    if target is None:
      return leaf
    fan_in = tuple(range(target.stacked_axes, target.stacked_axes + target.fan_in_axes))
    return quantize.quantize_array(leaf, "int8", reduce_axes=fan_in, name=f"leaf {target.path!r}")

  return jax.tree_util.tree_map_with_path(convert, params)


def merge_int8(quantized_params: Params, adapter_params: AdapterParams, config: AdapterConfig) -> Params:
  """Merges an adapter into an int8 base: dequantize, ``reparam.merge`` in float32, re-quantize the targets."""
  leaves = jax.tree.leaves(quantized_params, is_leaf=quantize.is_quantized)
  if not any(quantize.is_quantized(x) and x.fmt == "int8" for x in leaves):
    raise ValueError(
        "merge_int8 expects a base quantized with quantize_int8 (int8 QuantizedArray leaves); for float "
        "or bfloat16 bases use reparam.merge, for 4-bit bases jaxpeft.quantize.merge."
    )
  merged = reparam.merge(quantize.dequantize_tree(quantized_params), adapter_params, config)
  return quantize_int8(merged, config)


def merge_error(base_params: Params, adapter_params: AdapterParams, config: AdapterConfig) -> dict[str, dict]:
  """Errors of the low-precision merges of a float32 base against float32 merges (``max_errors``).

  Keys: ``"bf16"`` (bf16 base merged by ``reparam.merge`` vs the float32 merge of the same bf16 values),
  ``"bf16_vs_float_base"`` (vs the float32 merge of the original base), ``"bf16_naive"`` (the update rounded
  to bf16 and added in bf16, for comparison), ``"int8"`` (``merge_int8`` vs the float32 merge of the
  dequantized base), ``"int8_vs_float_base"`` (vs the float32 merge of the original base: quantizing the
  base adds its own half step).
  """
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base_params)
  bf16_up = jax.tree.map(lambda x: x.astype(jnp.float32), bf16)
  exact_bf16 = reparam.merge(bf16_up, adapter_params, config)
  naive = jax.tree.map(lambda w, m: (w + (m - w).astype(jnp.bfloat16)).astype(jnp.bfloat16), bf16, exact_bf16)
  quantized = quantize_int8(base_params, config)
  dequantized = quantize.dequantize_tree(quantized)
  return {
      "bf16": max_errors(reparam.merge(bf16, adapter_params, config), exact_bf16, config),
      "bf16_vs_float_base": max_errors(
          reparam.merge(bf16, adapter_params, config), reparam.merge(base_params, adapter_params, config), config
      ),
      "bf16_naive": max_errors(naive, exact_bf16, config),
      "int8": max_errors(
          quantize.dequantize_tree(merge_int8(quantized, adapter_params, config)),
          reparam.merge(dequantized, adapter_params, config),
          config,
      ),
      "int8_vs_float_base": max_errors(
          quantize.dequantize_tree(merge_int8(quantized, adapter_params, config)),
          reparam.merge(base_params, adapter_params, config),
          config,
      ),
  }


def measure_example(d: int = 1024, rank: int = 16) -> dict[str, dict]:
  """``merge_error`` on the example of the module docstring (one ``d x d`` kernel, a rank-``rank`` LoRA)."""
  k_w, k_a, k_b = jax.random.split(jax.random.key(0), 3)
  base = {"layer": {"kernel": 0.02 * jax.random.normal(k_w, (d, d))}}
  config = AdapterConfig(targets="layer/kernel", rank=rank, alpha=float(rank))
  adapter = {
      "layer": {
          "kernel": {
              "a": jax.random.normal(k_a, (d, rank)) / jnp.sqrt(d),
              "b": 2e-3 * jnp.sqrt(d / rank) * jax.random.normal(k_b, (rank, d)),
          }
      }
  }
  return merge_error(base, adapter, config)
