"""Tests for benchmarks/optim.py: state bytes, bytes moved and paired ratios against closed forms."""

import numpy as np
import optax
import pytest

from benchmarks.optim import Timing, matrix_shapes, representative_params, state_bytes_per_param, update_bytes
from jaxpeft.optim import came

SIZE = 1_000_000


def test_adam_state_is_two_float32_moments():
  # Adam keeps m and v (4 bytes each per parameter) and one int32 step count.
  num_params = sum(r * c for r, c in matrix_shapes(SIZE))
  expected = 8 + 4 / num_params
  assert state_bytes_per_param(optax.adam(1e-3), representative_params(SIZE)) == pytest.approx(expected, rel=1e-12)


def test_came_second_moments_are_factored():
  # CAME (Luo et al. 2023): a full first moment, and rows + cols floats per matrix for each of the
  # factored second moment and the factored instability (the paper's memory argument).
  shapes = matrix_shapes(SIZE)
  num_params = sum(r * c for r, c in shapes)
  expected = 4 + sum(4 * 2 * (r + c) for r, c in shapes) / num_params
  ours = state_bytes_per_param(came(1e-3), representative_params(SIZE))
  np.testing.assert_allclose(ours, expected, rtol=1e-4)  # besides: one (1,) placeholder per matrix
  assert ours < 4.1


def test_update_bytes_of_adam():
  # Read params, grads, m, v; write params, m, v: 7 float32 arrays of the parameters' size.
  num_params = sum(r * c for r, c in matrix_shapes(SIZE))
  assert update_bytes(optax.adam(1e-3), representative_params(SIZE)) == 7 * 4 * num_params + 2 * 4


def test_paired_ratio_and_quartiles():
  a, b = Timing((1.0, 2.0, 9.0, 4.0, 5.0)), Timing((2.0, 1.0, 3.0, 4.0, 10.0))
  # Per-round ratios 0.5, 2, 3, 1, 0.5: their median is 1 (the ratio of medians would be 4/3).
  assert a.paired_ratio(b) == 1.0
  assert a.quartiles() == (2.0, 4.0, 5.0)
