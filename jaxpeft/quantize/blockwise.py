"""Blockwise absmax quantization with a codebook, 4-bit packing, and double quantization of the scales.

Blockwise absmax (QLoRA, Dettmers et al. 2023, sec. 2 and 3; bitsandbytes ``quantize_4bit``): the flattened
(row-major) tensor is cut into blocks of ``block_size`` consecutive entries; block ``b`` stores its absmax
``a_b = max |x_i|`` in float32 and, per entry, the index of the codebook value nearest to ``x_i / a_b``::

    q_i = argmin_k |T_k - clip(x_i * (1 / a_b), -1, 1)|,      x~_i = T[q_i] * a_b

computed as ``searchsorted`` of the table's midpoints (a value exactly on a midpoint takes the lower entry,
``torch.bucketize`` semantics, as the reference). The scaled value is ``x * (1 / a)`` -- the reciprocal first,
as the reference -- so the indices equal bitsandbytes' bit for bit. An all-zero block uses ``a = 1e-38``
in the division (the reference's clamp), giving index of 0 and value 0.

Packing: two 4-bit indices per uint8, the first (even) entry in the high nibble: ``byte = q_{2j} << 4 | q_{2j+1}``
(bitsandbytes' byte order).

Double quantization (QLoRA sec. 3, "Double Quantization"; bitsandbytes ``compress_statistics=True``): the
float32 absmaxes ``a_b`` are themselves quantized to 8 bits with the signed dynamic map
(``codebooks.DYNAMIC8``) in blocks of 256 after subtracting their mean ``c``::

    c = mean_b(a_b),   (q2, a2) = blockwise(a - c, DYNAMIC8, block 256),
    a~_b = DYNAMIC8[q2_b] * a2_{b // 256} + c

so a 4-bit weight costs ``4 + 8 / block_size + 32 / (256 * block_size)`` bits (4.127 for block 64) instead of
``4 + 32 / block_size`` (4.5). The last block of scales may be partial (the reference's remainder block).
Deviation: none in the values; bitsandbytes stores the packed bytes as an ``(n / 2, 1)`` tensor, here ``(n / 2,)``.
(bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` mis-decodes weights whose last axis is not a multiple of
the block, e.g. ``(64, 96)`` with block 64; its pure-PyTorch kernel and the codes decoded by hand agree with
this module, and its ``quantize_4bit`` codes equal ours for every shape tested.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.quantize.codebooks import DYNAMIC8

SCALE_BLOCK = 256
_TINY = 1e-38


def _nearest(scaled: jax.Array, table: np.ndarray) -> jax.Array:
  """Index of the table entry nearest to each value (midpoint ties go to the lower entry)."""
  midpoints = jnp.asarray((table[:-1] + table[1:]) / np.float32(2))
  return jnp.searchsorted(midpoints, scaled, side="left").astype(jnp.uint8)


def quantize_blocks(flat: jax.Array, table: np.ndarray, block_size: int) -> tuple[jax.Array, jax.Array]:
  """``(indices uint8 (n,), absmax float32 (n / block_size,))`` of a 1-D array whose size divides into blocks."""
  blocks = flat.astype(jnp.float32).reshape(-1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, _TINY))[:, None], -1.0, 1.0)
  return _nearest(scaled, table).reshape(-1), absmax


def dequantize_blocks(indices: jax.Array, table: np.ndarray, absmax: jax.Array, block_size: int) -> jax.Array:
  """Float32 ``T[q] * a`` per block (1-D)."""
  values = jnp.asarray(table)[indices.astype(jnp.int32)].reshape(-1, block_size)
  return (values * absmax[:, None]).reshape(-1)


def pack_nibbles(indices: jax.Array) -> jax.Array:
  """Two 4-bit indices per byte, the even entry in the high nibble."""
  pairs = indices.astype(jnp.uint8).reshape(-1, 2)
  return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of ``pack_nibbles``: ``(n / 2,)`` bytes -> ``(n,)`` indices."""
  return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)


def quantize_scales(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Double quantization: ``(codes uint8 (n,), absmax2 float32 (ceil(n / 256),), offset float32 ())``."""
  offset = jnp.mean(absmax)
  n = absmax.shape[0]
  padded = jnp.pad(absmax - offset, (0, -n % SCALE_BLOCK))  # zeros do not change a block's absmax
  codes, absmax2 = quantize_blocks(padded, DYNAMIC8, SCALE_BLOCK)
  return codes[:n], absmax2, offset


def dequantize_scales(codes: jax.Array, absmax2: jax.Array, offset: jax.Array) -> jax.Array:
  """Float32 absmaxes ``DYNAMIC8[q2] * a2 + c`` from ``quantize_scales``' output."""
  n = codes.shape[0]
  padded = jnp.pad(codes, (0, -n % SCALE_BLOCK))
  return dequantize_blocks(padded, DYNAMIC8, absmax2, SCALE_BLOCK)[:n] + offset
