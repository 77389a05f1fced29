"""Houlsby adapters through module hooks, against the plain-numpy forward pass of the tiny transformer
(``tests.adapters.module_hook_checks``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import module_hooks, reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import module_hook_checks as mh

M = 3
CFG = AdapterConfig(targets=r"block_\d+/(out|mlp/fc2)/kernel", method="houlsby", rank=M)


def _np_adapter(leaves):
  lv = mh.np_tree(leaves)
  return lambda h: h + mh.np_gelu(h @ lv["down"] + lv["down_bias"]) @ lv["up"] + lv["up_bias"]


def test_output_equals_numpy_forward():
  model, x, params = mh.model_and_input()
  adapter = mh.randomize(reparam.init(jax.random.key(1), CFG, params))
  out = {i: _np_adapter(adapter[f"block_{i}"]["out"]["kernel"]) for i in range(mh.DEPTH)}
  fc2 = {i: _np_adapter(adapter[f"block_{i}"]["mlp"]["fc2"]["kernel"]) for i in range(mh.DEPTH)}
  expect = mh.np_forward(params, x, out_proj=lambda i, y: out[i](y), fc2=lambda i, y: fc2[i](y))
  base = mh.np_forward(params, x)
  np.testing.assert_allclose(model.apply({"params": params}, x), base, rtol=1e-5, atol=1e-5)
  assert not np.allclose(expect, base, atol=1e-2)
  np.testing.assert_allclose(
      jax.jit(mh.hooked_apply, static_argnums=(0, 3))(model, params, adapter, CFG, x), expect, rtol=1e-5, atol=1e-5
  )


def test_zero_up_is_the_base_model_and_init_is_near_identity():
  model, x, params = mh.model_and_input()
  adapter = mh.randomize(reparam.init(jax.random.key(1), CFG, params))
  zero_up = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if path[-1].key in ("up", "up_bias") else v, adapter
  )
  np.testing.assert_array_equal(
      mh.hooked_apply(model, params, zero_up, CFG, x), model.apply({"params": params}, x)
  )
  init = reparam.init(jax.random.key(1), CFG, params)
  np.testing.assert_allclose(
      mh.hooked_apply(model, params, init, CFG, x), model.apply({"params": params}, x), atol=1e-4
  )


def test_init_and_param_count():
  params = {"layer": {"kernel": jnp.zeros((4, 256))}}
  adapter = reparam.init(
      jax.random.key(0), AdapterConfig(targets="layer/kernel", method="houlsby", rank=128), params
  )["layer"]["kernel"]
  for name in ("down", "up"):  # TF truncated_normal(stddev=1e-3): cut at 2 std, std 0.8796e-3
    w = np.asarray(adapter[name])
    assert np.abs(w).max() <= 2e-3 and np.abs(w).max() > 1.9e-3
    np.testing.assert_allclose(w.std(), 0.8796e-3, rtol=0.03)
  np.testing.assert_array_equal(adapter["down_bias"], 0.0)
  np.testing.assert_array_equal(adapter["up_bias"], 0.0)
  _, _, vit = mh.model_and_input()
  count = sum(v.size for v in jax.tree.leaves(reparam.init(jax.random.key(0), CFG, vit)))
  assert count == 2 * mh.DEPTH * (2 * M * mh.D + M + mh.D)


def test_training_and_checkpoint(tmp_path):
  model, x, params = mh.model_and_input()
  mh.check_training_reduces_loss(model, x, params, CFG)
  mh.check_checkpoint_round_trip(
      tmp_path, model, x, params, mh.randomize(reparam.init(jax.random.key(1), CFG, params)), CFG
  )


def test_errors():
  model, x, params = mh.model_and_input()
  adapter = reparam.init(jax.random.key(1), CFG, params)
  with pytest.raises(ValueError, match="adds modules to the forward pass"):
    reparam.apply(params, adapter, CFG)
  with pytest.raises(ValueError, match="were not called inside the intercept block"):
    with module_hooks.intercept(params, adapter, CFG):
      pass
  with pytest.raises(ValueError, match="does not add modules"):
    with module_hooks.intercept(params, adapter, AdapterConfig(targets=".*out/kernel")):
      pass
  with pytest.raises(ValueError, match="has no adapter dropout"):
    reparam.init(jax.random.key(1), AdapterConfig(targets=".*out/kernel", method="houlsby", dropout=0.1), params)
  with pytest.raises(ValueError, match="unknown activation"):
    reparam.init(
        jax.random.key(1),
        AdapterConfig(targets=".*out/kernel", method="houlsby", options={"activation": "tanh"}),
        params,
    )
