"""Tests for jaxpeft/train/sharding.py on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
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
  with pytest.raises(
      ValueError, match=r"batch_size=12 is not divisible by the number of devices \(8\).*batch_size=8"
  ):
    sharding.check_batch_size(12, sharding.make_mesh())


def test_fsdp_spreads_lora_factors_and_sharded_apply_equals_unsharded():
  """LoRA `a` splits along d_in, `b` along d_out; a jitted apply on FSDP-sharded trees gives the same weights."""
  mesh = sharding.make_mesh()
  k1, k2 = jax.random.split(jax.random.key(0))
  base = {"up": {"kernel": jax.random.normal(k1, (16, 32))}, "down": {"kernel": jax.random.normal(k2, (32, 16))}}
  cfg = AdapterConfig(targets=r".*/kernel", rank=8, init="random")
  adapter = reparam.init(jax.random.key(1), cfg, base)
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(adapter, mesh, fsdp=True))
  for name in ("up", "down"):
    assert specs[name]["kernel"] == {"a": P("data", None), "b": P(None, "data")}
  base_sh = sharding.state_shardings(base, mesh, fsdp=True)
  adapter_sh = sharding.state_shardings(adapter, mesh, fsdp=True)
  apply = jax.jit(lambda b, a: reparam.apply(b, a, cfg), out_shardings=base_sh)
  out = apply(jax.device_put(base, base_sh), jax.device_put(adapter, adapter_sh))
  assert out["up"]["kernel"].sharding.spec == P(None, "data")
  for name in ("up", "down"):  # alpha = rank: scale 1
    lv = {k: np.asarray(v, np.float64) for k, v in adapter[name]["kernel"].items()}
    expect = np.asarray(base[name]["kernel"], np.float64) + lv["a"] @ lv["b"]
    np.testing.assert_allclose(np.asarray(out[name]["kernel"]), expect, rtol=1e-5, atol=1e-5)


def test_model_parallel_mesh_and_layouts_of_parameters_and_their_optimizer_state():
  """With `model_parallel`, a parameter and every state leaf mirroring it (same path suffix and shape) share a spec."""
  mesh = sharding.make_mesh(model_parallel=4)
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  layouts = {"up/kernel": ((16, 32), P("data", "model")), "adapter/up/kernel/b": ((2, 32), P(None, "model"))}
  state = {
      "frozen": {"up": {"kernel": jnp.zeros((16, 32))}},
      "params": {"adapter": {"up": {"kernel": {"b": jnp.zeros((2, 32))}}}},
      "opt_state": {
          "mu": {"adapter": {"up": {"kernel": {"b": jnp.zeros((2, 32))}}}},
          "v_row": {"adapter": {"up": {"kernel": {"b": jnp.zeros((2,))}}}},  # a factored moment: not a mirror
      },
      "step": jnp.zeros(()),
  }
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh, fsdp=True, layouts=layouts))
  assert specs["frozen"]["up"]["kernel"] == P("data", "model")
  assert specs["params"]["adapter"]["up"]["kernel"]["b"] == P(None, "model")
  assert specs["opt_state"]["mu"]["adapter"]["up"]["kernel"]["b"] == P(None, "model")
  assert specs["opt_state"]["v_row"]["adapter"]["up"]["kernel"]["b"] == P("data")  # the FSDP rule
  assert specs["step"] == P()


def test_model_parallel_that_does_not_divide_the_devices_names_the_fix():
  with pytest.raises(ValueError, match=r"model_parallel=3 does not divide the 8 devices .* use a divisor of 8"):
    sharding.make_mesh(model_parallel=3)
