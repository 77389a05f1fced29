"""The codebooks equal bitsandbytes' tables bit for bit; int4 is the symmetric grid k/7."""

import numpy as np
import torch  # noqa: F401  (bitsandbytes needs torch imported first)
from bitsandbytes.functional import create_dynamic_map, get_4bit_type

from jaxpeft.quantize import codebooks


def test_nf4_equals_bitsandbytes():
  np.testing.assert_array_equal(codebooks.NF4, get_4bit_type("nf4", device="cpu").numpy())


def test_dynamic_map_equals_bitsandbytes():
  np.testing.assert_array_equal(codebooks.DYNAMIC8, create_dynamic_map(signed=True).numpy())


def test_int4_is_symmetric_grid():
  np.testing.assert_allclose(codebooks.INT4[1:], np.arange(-7, 8) / 7.0, rtol=0, atol=1e-7)
  assert np.all(np.diff(codebooks.INT4) > 0)


def test_half_gaps():
  assert np.isclose(codebooks.half_gap(codebooks.NF4), (1 - 0.6961928009986877) / 2)
  assert np.isclose(codebooks.half_gap(codebooks.INT4), 1 / 14)
