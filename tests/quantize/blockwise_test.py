"""Blockwise absmax, the packed byte order and double quantization equal bitsandbytes' CPU functions."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes import functional as bnbf

from jaxpeft.quantize import blockwise
from jaxpeft.quantize.codebooks import DYNAMIC8, NF4

RNG = np.random.RandomState(0)


@pytest.mark.parametrize("block_size", [64, 256])
def test_nf4_codes_and_absmax_equal_bitsandbytes(block_size):
  w = RNG.standard_normal((48, 256)).astype(np.float32)
  packed, state = bnbf.quantize_4bit(torch.tensor(w), blocksize=block_size, quant_type="nf4")
  indices, absmax = blockwise.quantize_blocks(jnp.asarray(w).reshape(-1), NF4, block_size)
  np.testing.assert_array_equal(np.asarray(blockwise.pack_nibbles(indices)), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
  want = bnbf.dequantize_4bit(packed, state).numpy().reshape(-1)
  np.testing.assert_array_equal(np.asarray(blockwise.dequantize_blocks(indices, NF4, absmax, block_size)), want)


def test_packing_puts_the_even_entry_in_the_high_nibble():
  indices = jnp.array([1, 2, 15, 0], jnp.uint8)
  np.testing.assert_array_equal(np.asarray(blockwise.pack_nibbles(indices)), [0x12, 0xF0])
  np.testing.assert_array_equal(np.asarray(blockwise.unpack_nibbles(blockwise.pack_nibbles(indices))), indices)


@pytest.mark.parametrize("n", [256, 600])  # 600: a partial last block of scales, as the reference allows
def test_double_quantization_equals_bitsandbytes(n):
  absmax = np.abs(RNG.standard_normal(n)).astype(np.float32) + 0.5
  offset = torch.tensor(absmax).mean()  # as bitsandbytes' quantize_4bit(compress_statistics=True)
  codes, state2 = bnbf.quantize_blockwise(torch.tensor(absmax) - offset, blocksize=256)
  offset = float(offset)
  got_codes, got_absmax2, got_offset = blockwise.quantize_scales(jnp.asarray(absmax))
  np.testing.assert_allclose(float(got_offset), offset, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(got_codes), codes.numpy())
  # the float32 means may differ in the last bit (summation order), hence rtol on the scale of scales
  np.testing.assert_allclose(np.asarray(got_absmax2), state2.absmax.numpy(), rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(blockwise.dequantize_scales(got_codes, got_absmax2, got_offset)),
      bnbf.dequantize_blockwise(codes, state2).numpy() + offset,
      rtol=1e-6,
  )
  # 8-bit dynamic map: at most half its widest gap times the group's absmax.
  bound = np.max(np.diff(DYNAMIC8)) / 2 * np.repeat(state2.absmax.numpy(), 256)[:n] * 1.0001
  err = np.abs(np.asarray(blockwise.dequantize_scales(got_codes, got_absmax2, got_offset)) - absmax)
  assert np.all(err <= bound + 1e-7)
