"""Quantizing a parameter tree by a regex over its '/'-joined paths, and dequantizing it back.

    qparams = quantize_tree(params, r".*/kernel", fmt="nf4", block_size=64, double_quant=True)
    params_again = dequantize_tree(qparams)      # inside the jitted step

Selection is the adapters' rule (``jaxpeft.adapters.selection``): ``re.fullmatch`` on the path, e.g.
``encoder/layer_0/attention/query/kernel``; a pattern that matches nothing raises, listing the paths. Matched
leaves become ``QuantizedArray`` leaves (the other leaves are returned unchanged); each must be a float array of
at least two axes whose size is a multiple of ``block_size`` (4-bit formats), else a ``ValueError`` names it.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters.selection import named_leaves, path_string
from jaxpeft.quantize.quantized_array import QuantizedArray, quantize_array

Params = Any


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def quantize_tree(
    params: Params, pattern: str, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> Params:
  """``params`` with the leaves whose path fully matches ``pattern`` replaced by ``QuantizedArray``s."""
  leaves = list(named_leaves(params))
  if not any(re.fullmatch(pattern, path) for path, _ in leaves):
    available = "\n  ".join(f"{p} {tuple(getattr(l, 'shape', ()))}" for p, l in leaves)
    raise ValueError(
        f"Quantization pattern {pattern!r} matches no parameter (re.fullmatch on '/'-joined paths). "
        f"Available paths:\n  {available}"
    )

  def convert(key_path, leaf):
    path = path_string(key_path)
    if not re.fullmatch(pattern, path):
      return leaf
    return quantize_array(leaf, fmt, block_size, double_quant, name=f"leaf {path!r}")

  return jax.tree_util.tree_map_with_path(convert, params)


def dequantize_tree(params: Params) -> Params:
  """``params`` with every ``QuantizedArray`` replaced by its dequantized array (its original dtype)."""
  return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized)


def quantized_paths(params: Params) -> list[str]:
  """The '/'-joined paths of the ``QuantizedArray`` leaves of ``params``."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
  return [path_string(kp) for kp, leaf in flat if is_quantized(leaf)]


def check_frozen(trainable: Params, what: str = "the trainable set") -> None:
  """Raises if ``trainable`` (what an optimizer is about to train) holds a quantized leaf."""
  paths = quantized_paths(trainable)
  if paths:
    raise ValueError(
        f"{what} contains quantized leaves {paths}; quantized weights are frozen. Exclude them "
        "from the trainable pattern (train an adapter on them) or from the quantization pattern."
    )


def bytes_per_param(params: Params) -> float:
  """Bytes of memory per weight of ``params`` (a ``QuantizedArray`` counts its codes and scales)."""
  leaves = jax.tree.leaves(params, is_leaf=is_quantized)
  n_bytes = sum(x.nbytes if is_quantized(x) else x.size * jnp.dtype(x.dtype).itemsize for x in leaves)
  n_params = sum(x.size for x in leaves)
  return n_bytes / n_params
