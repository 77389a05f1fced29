"""Smoke test of `benchmarks/matmul.py`: every timed jax product equals its torch counterpart, and each is timed."""

import numpy as np
import pytest

from benchmarks import matmul


def test_each_jax_product_equals_torchs_and_is_timed():
  products = matmul._products(tokens=24, hidden=8, ffn=16, batch=4, rank=4)
  for name, _, jax_fn, jax_args, torch_fn, torch_args in products:
    expected = torch_fn(*torch_args).numpy()
    np.testing.assert_allclose(np.asarray(jax_fn(*jax_args)), expected, rtol=1e-5, atol=1e-5, err_msg=name)
  # Four products per weight (forward, input gradient, the weight gradient from 2-D and 3-D activations) of 2 T m n
  # FLOPs each, and the weight gradient as (dy^T x)^T for the two narrowing weights, (16, 8) and the (8, 4) factor.
  assert sum(p[1] for p in products) == 4 * 2 * 24 * (8 * 8 + 8 * 16 + 16 * 8 + 8 * 4) + 2 * 24 * (16 * 8 + 8 * 4)
  results = matmul.measure(tokens=24, hidden=8, ffn=16, batch=4, rounds=2, steps=1, rank=4)
  assert len(results) == 18
  assert all(len(r["jax"]) == len(r["torch"]) == 2 and min(r["jax"] + r["torch"]) > 0 for r in results)


def test_tokens_must_split_into_the_batch():
  with pytest.raises(ValueError, match="not a multiple of --batch"):
    matmul._products(tokens=24, hidden=8, ffn=16, batch=5)
