"""``QuantizedArray``: one frozen weight stored as packed codes plus scales, a pytree leaf of a parameter tree.

Formats (``fmt``):

* ``"nf4"`` -- QLoRA's NormalFloat4 (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023):
  blockwise absmax over the row-major flattened weight, the nearest of the 16 NF4 values, two codes per byte
  (``jaxpeft.quantize.blockwise``, ``codebooks.NF4``); optionally double-quantized scales.
* ``"int4"`` -- symmetric 4-bit: the same blocks and packing with the grid ``k / 7, k = -7..7``
  (``x~ = round(7 x / a) * a / 7``); optionally double-quantized scales.
* ``"int8"`` -- symmetric int8 per output channel (the leaf's last axis, Flax's ``(in, out)`` kernel layout):
  ``s_j = max_i |W_ij| / 127``, ``q = clip(round(W / s), -127, 127)``, no blocks, no double quantization,
  stored unpacked as int8. ``reduce_axes`` picks the axes one scale spans (default: every axis but the last;
  ``jaxpeft.adapters.low_precision_merge`` passes a target's fan-in axes, so stacked layers get a scale each).

Error bounds per element (``a``: the block's absmax, or channel's for int8): nf4 ``<= 0.1519 a``, int4
``<= a / 14``, int8 ``<= a / 254`` (half the widest gap of the grid, ``codebooks.half_gap``); double
quantization adds ``|a - a~| <= 0.00703 a2`` (``a2``: the absmax of the 256 centred scales of the block's group).

The array is a ``flax.struct`` dataclass: its arrays (``codes``, ``scales``, and with double quantization
``scale_scales``, ``scale_offset``) are pytree children, everything else is static metadata, so a tree
holding ``QuantizedArray`` leaves passes through ``jit``, ``device_put``, sharding and Orbax like any other.
``dequantize`` is pure ``jnp`` and belongs inside the jitted step: only the packed codes live in memory
between steps.

Quantized leaves are frozen: differentiating through ``dequantize`` with respect to the quantized array (e.g.
``jax.grad(loss)(quantized_params, allow_int=True)``) raises a ``ValueError`` at trace time -- the codes
are integers and a gradient on the scales alone is not training the weight. Train an adapter on it instead.
(``jax.grad`` without ``allow_int`` already refuses the uint8 codes.) Gradients with respect to other
arguments (the adapter) do not touch this rule.

``transposed=True`` stores a 2-D leaf in the transposed (PyTorch ``(out, in)``) order, so that the codes and
scales of a bitsandbytes ``Linear4bit`` weight can be used unchanged for the Flax kernel ``(in, out)``;
``dequantize`` transposes back.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxpeft.quantize import blockwise
from jaxpeft.quantize.codebooks import FOUR_BIT

FORMATS = ("nf4", "int4", "int8")
_INT8_MAX = 127


@flax.struct.dataclass
class QuantizedArray:
  """A frozen weight as codes and scales; ``dequantize()`` gives the ``shape``/``dtype`` array back.

  Attributes:
    codes: 4-bit formats: uint8 ``(size / 2,)``, two codes per byte (high nibble first); int8: int8 ``shape``.
    scales: 4-bit formats: float32 absmax per block ``(size / block_size,)``, or with double quantization
      their uint8 codes; int8: float32 ``(1, ..., 1, shape[-1])``.
    scale_scales: double quantization only: float32 absmax per 256 centred scales.
    scale_offset: double quantization only: the float32 mean subtracted from the scales.
    fmt: ``"nf4"``, ``"int4"`` or ``"int8"``.
    shape: the weight's shape. dtype: its dtype name (the dequantized result's dtype).
    block_size: entries per block (4-bit formats; 0 for int8).
    transposed: the codes hold the transpose of the 2-D weight (bitsandbytes ``(out, in)`` order).
  """

  codes: jax.Array
  scales: jax.Array
  scale_scales: jax.Array | None = None
  scale_offset: jax.Array | None = None
  fmt: str = flax.struct.field(pytree_node=False, default="nf4")
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  dtype: str = flax.struct.field(pytree_node=False, default="float32")
  block_size: int = flax.struct.field(pytree_node=False, default=64)
  transposed: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def double_quant(self) -> bool:
    return self.scale_offset is not None

  @property
  def scale_axes(self) -> tuple[int, ...]:
    """int8: the axes each scale spans (``reduce_axes`` of ``quantize_array``), read off the scales' shape."""
    return tuple(i for i, (s, n) in enumerate(zip(self.scales.shape, self.shape)) if s == 1 and n > 1)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held by the codes and scales (what the frozen weight costs in memory and on disk)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

  def dequantize(self) -> jax.Array:
    """The weight, ``shape`` and ``dtype`` (computed in float32, cast once). Frozen: see the module docstring."""
    return _dequantize(self)


def _decode(q: QuantizedArray) -> jax.Array:
  if q.fmt == "int8":
    values = q.codes.astype(jnp.float32) * q.scales
  else:
    scales = blockwise.dequantize_scales(q.scales, q.scale_scales, q.scale_offset) if q.double_quant else q.scales
    flat = blockwise.dequantize_blocks(blockwise.unpack_nibbles(q.codes), FOUR_BIT[q.fmt], scales, q.block_size)
    values = flat.reshape(q.shape[::-1] if q.transposed else q.shape)
    if q.transposed:
      values = values.T
  return values.astype(q.dtype)


@jax.custom_jvp
def _dequantize(q: QuantizedArray) -> jax.Array:
  return _decode(q)


def _dequantize_jvp(primals, tangents):
  (q,), (dq,) = primals, tangents
  perturbed = [
      t
      for t in jax.tree.leaves(dq, is_leaf=lambda t: isinstance(t, SymbolicZero))
      if not isinstance(t, SymbolicZero) and t.dtype != jax.dtypes.float0
  ]
  if perturbed:
    raise ValueError(
        f"A quantized {q.fmt} leaf of shape {q.shape} is being differentiated, but quantized "
        "weights are frozen. Train an adapter on it (jaxpeft.quantize.apply) and differentiate "
        "only the adapter, or keep this leaf out of quantize_tree's pattern to train it."
    )
  out = _decode(q)
  return out, jnp.zeros_like(out)


_dequantize.defjvp(_dequantize_jvp, symbolic_zeros=True)


def _check_quantizable(x: jax.Array, fmt: str, block_size: int, double_quant: bool, name: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"Unknown quantization format {fmt!r} for {name}; use one of {FORMATS}.")
  if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{name} is not a floating-point array (got {type(x).__name__} {getattr(x, 'dtype', '')}); "
        "narrow the quantization pattern."
    )
  if x.ndim < 2:
    raise ValueError(
        f"{name} has shape {tuple(x.shape)}: 1-D leaves (biases, norms) are not quantized; narrow "
        "the pattern to weight matrices, e.g. r'.*/kernel'."
    )
  if fmt == "int8":
    if double_quant:
      raise ValueError(
          f"double_quant applies to the 4-bit formats' block scales; int8 ({name}) has one scale per "
          "output channel. Use double_quant=False."
      )
    return
  if block_size < 2 or block_size % 2:
    raise ValueError(f"block_size={block_size} must be an even number >= 2 (QLoRA uses 64).")
  if x.size % block_size:
    raise ValueError(
        f"{name} of shape {tuple(x.shape)} has {x.size} entries, not a multiple of "
        f"block_size={block_size}; use a block size dividing it or exclude the leaf from the "
        "pattern."
    )


def quantize_array(
    x: jax.Array,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    *,
    transposed: bool = False,
    reduce_axes: tuple[int, ...] | None = None,
    name: str = "the array",
) -> QuantizedArray:
  """Quantizes one float array (at least 2-D) to ``fmt``; ``name`` is used in error messages.

  ``transposed=True`` quantizes the 2-D ``x.T`` (bitsandbytes' ``(out, in)`` order for a Flax ``(in, out)``
  kernel); ``dequantize`` still returns ``x``'s layout. ``reduce_axes`` (int8 only): the axes one scale spans,
  default every axis but the last.
  """
  _check_quantizable(x, fmt, block_size, double_quant, name)
  if reduce_axes is not None and fmt != "int8":
    raise ValueError(f"reduce_axes is for int8's per-channel scales; {name} is quantized to {fmt!r} blocks.")
  reduce_axes = tuple(range(x.ndim - 1)) if reduce_axes is None else tuple(a % x.ndim for a in reduce_axes)
  if transposed and (fmt == "int8" or x.ndim != 2):
    raise ValueError(
        f"transposed=True is for 2-D kernels in a 4-bit format; {name} has shape {tuple(x.shape)} "
        f"and format {fmt!r}."
    )
  return _encode(x, fmt, block_size, double_quant, transposed, reduce_axes)


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "double_quant", "transposed", "reduce_axes"))
def _encode(
    x: jax.Array, fmt: str, block_size: int, double_quant: bool, transposed: bool, reduce_axes: tuple[int, ...]
) -> QuantizedArray:
  """The checked quantization (one compiled program per shape and format, not op-by-op dispatch)."""
  meta = dict(fmt=fmt, shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name, transposed=transposed)
  if fmt == "int8":
    w = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True) / _INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(w / scale), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
    return QuantizedArray(codes=codes, scales=scale, block_size=0, **meta)
  flat = (x.T if transposed else x).reshape(-1)
  indices, absmax = blockwise.quantize_blocks(flat, FOUR_BIT[fmt], block_size)
  codes = blockwise.pack_nibbles(indices)
  if not double_quant:
    return QuantizedArray(codes=codes, scales=absmax, block_size=block_size, **meta)
  scale_codes, scale_scales, offset = blockwise.quantize_scales(absmax)
  return QuantizedArray(
      codes=codes,
      scales=scale_codes,
      scale_scales=scale_scales,
      scale_offset=offset,
      block_size=block_size,
      **meta,
  )
