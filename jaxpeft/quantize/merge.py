"""Merging an adapter into a quantized base: dequantize, merge in float32, re-quantize (or keep bf16/float32).

For each targeted leaf stored as a ``QuantizedArray``::

    W' = reparam.merge(dequant(Q), adapter)  (float32),   Q' = quantize(W', same format, block, double quant)

which is what Hugging Face PEFT does for bitsandbytes 4/8-bit bases (``merge_and_unload`` dequantizes, adds
the update, re-quantizes and warns about rounding). The re-quantization error against the float32 merge is
the format's bound on ``W'`` (``jaxpeft.quantize.quantized_array``): per element ``<= 0.1519 a'`` (nf4),
``a' / 14`` (int4), ``a' / 254`` (int8), ``a'`` the absmax of the merged block or channel, plus the double
quantization term. ``keep="bfloat16"`` returns the merged leaves in bfloat16 instead (error ``<= 2^-8`` relative,
``jaxpeft.adapters.low_precision_merge``), ``keep="float32"`` unrounded. Quantized leaves the adapter does not
target are returned as they are (not re-rounded).

``merge_error`` reports the errors as ``low_precision_merge.merge_error`` does (``adapters.merge_errors``: max
abs, max elementwise relative, Frobenius-relative over the targets).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.merge_errors import max_errors
from jaxpeft.adapters.reparam import AdapterParams, Params
from jaxpeft.adapters.selection import path_string, select_targets
from jaxpeft.quantize.quantized_array import quantize_array
from jaxpeft.quantize.tree import dequantize_tree, is_quantized

KEEP = ("quantized", "bfloat16", "float32")


def _float32_base(quantized_params: Params) -> Params:
  return jax.tree.map(
      lambda x: x.dequantize().astype(jnp.float32) if is_quantized(x) else x,
      quantized_params,
      is_leaf=is_quantized,
  )


def merge(
    quantized_params: Params, adapter_params: AdapterParams, config: AdapterConfig, *, keep: str = "quantized"
) -> Params:
  """The merged model: targeted quantized leaves re-quantized (``keep="quantized"``) or in bf16 / float32."""
  if keep not in KEEP:
    raise ValueError(f"keep={keep!r}: use one of {KEEP}.")
  if not any(is_quantized(x) for x in jax.tree.leaves(quantized_params, is_leaf=is_quantized)):
    raise ValueError(
        "merge expects a base with QuantizedArray leaves (from quantize_tree); for float or bfloat16 "
        "bases use jaxpeft.adapters.reparam.merge."
    )
  base = _float32_base(quantized_params)
  merged = reparam.merge(base, adapter_params, config)
  targets = {t.path for t in select_targets(config, base)}
  merged_leaves = {path_string(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]}

  def rebuild(key_path, leaf):
    path = path_string(key_path)
    if not is_quantized(leaf):
      return merged_leaves[path]
    if path not in targets:
      return leaf
    value = merged_leaves[path]
    if keep != "quantized":
      return value.astype(keep)
    requantized = quantize_array(
        value,
        leaf.fmt,
        leaf.block_size,
        leaf.double_quant,
        transposed=leaf.transposed,
        reduce_axes=leaf.scale_axes if leaf.fmt == "int8" else None,
        name=f"leaf {path!r}",
    )
    return dataclasses.replace(requantized, dtype=leaf.dtype)

  return jax.tree_util.tree_map_with_path(rebuild, quantized_params, is_leaf=is_quantized)


def merge_error(
    quantized_params: Params,
    adapter_params: AdapterParams,
    config: AdapterConfig,
    float_params: Params | None = None,
) -> dict[str, dict[str, float]]:
  """Errors of ``merge`` against float32 merges (``low_precision_merge``'s max abs / max rel / Frobenius rel).

  Keys: ``"requantized"`` (re-quantized merge vs the float32 merge of the dequantized base: the rounding of the
  merge alone), ``"bfloat16"`` (``keep="bfloat16"`` vs the same), and, when the original float base
  ``float_params`` is given, ``"requantized_vs_float_base"`` (vs the float32 merge of the unquantized base:
  both roundings, of the base and of the merge).
  """

  def merges(quantized_params, adapter_params, float_params):  # one compiled program instead of eager ops
    out = {
        "exact": reparam.merge(_float32_base(quantized_params), adapter_params, config),
        "requantized": dequantize_tree(merge(quantized_params, adapter_params, config)),
        "bfloat16": merge(quantized_params, adapter_params, config, keep="bfloat16"),
    }
    if float_params is not None:
      out["float_base"] = reparam.merge(float_params, adapter_params, config)
    return out

  got = jax.jit(merges)(quantized_params, adapter_params, float_params)
  errors = {key: max_errors(got[key], got["exact"], config) for key in ("requantized", "bfloat16")}
  if float_params is not None:
    errors["requantized_vs_float_base"] = max_errors(got["requantized"], got["float_base"], config)
  return errors
