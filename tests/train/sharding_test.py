"""Tests for jaxpeft/train/sharding.py on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpeft.train import sharding


def test_fsdp_shards_largest_divisible_axis_and_replicates_the_rest():
  mesh = sharding.make_mesh()
  tree = {"k": jnp.zeros((3, 16)), "b": jnp.zeros((16,)), "odd": jnp.zeros((3, 5)), "s": jnp.zeros(())}
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(tree, mesh, fsdp=True))
  assert specs == {"k": P(None, "data"), "b": P("data"), "odd": P(), "s": P()}
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(tree, mesh, fsdp=False))
  assert all(s == P() for s in jax.tree.leaves(specs))


def test_global_batch_is_split_over_devices():
  mesh = sharding.make_mesh()
  batch = sharding.global_batch({"x": np.arange(16.0).reshape(16, 1)}, mesh)
  assert batch["x"].shape == (16, 1)
  assert len(batch["x"].addressable_shards) == 8
  assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 1)}
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16.0).reshape(16, 1))


def test_indivisible_batch_size_names_the_fix():
  with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the number of devices \(8\).*batch_size=8"):
    sharding.check_batch_size(12, sharding.make_mesh())
