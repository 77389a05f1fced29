"""VeRA: closed form, shared-projection slicing, inits and parity with Hugging Face PEFT's ``VeraConfig``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import method_checks as mc

R = 4
CFG = AdapterConfig(targets="layer/kernel", method="vera", rank=R, init="random")


def _np_delta(leaves):
  a, b_proj, d, b = (np.asarray(leaves[k], np.float64) for k in ("proj_a", "proj_b", "d", "b"))
  return a @ np.diag(d) @ b_proj @ np.diag(b)


def test_closed_form_merge_unmerge_and_count():
  base = mc.dense_params(6, 5)
  adapter = reparam.init(jax.random.key(1), CFG, base)
  leaves = adapter["layer"]["kernel"]
  expect = np.asarray(base["layer"]["kernel"], np.float64) + _np_delta(leaves)
  np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], expect, atol=1e-6)
  mc.check_merge_unmerge(base, adapter, CFG)
  assert mc.trainable_count(adapter, CFG) == 5 + R  # d_out + r


def test_default_init_is_identity():
  base = mc.dense_params(6, 5)
  cfg = AdapterConfig(targets="layer/kernel", method="vera", rank=R)
  leaves = reparam.init(jax.random.key(1), cfg, base)["layer"]["kernel"]
  np.testing.assert_array_equal(leaves["b"], 0.0)
  np.testing.assert_array_equal(leaves["d"], np.float32(0.1))
  np.testing.assert_array_equal(
      reparam.apply(base, {"layer": {"kernel": leaves}}, cfg)["layer"]["kernel"], base["layer"]["kernel"]
  )


def test_projections_are_shared_slices_and_frozen():
  base = {"small": {"kernel": jnp.zeros((6, 5))}, "big": {"kernel": jnp.zeros((9, 7))}}
  cfg = AdapterConfig(targets=".*/kernel", method="vera", rank=R, options={"projection_shape": (9, 7)})
  adapter = reparam.init(jax.random.key(0), cfg, base)
  small, big = adapter["small"]["kernel"], adapter["big"]["kernel"]
  np.testing.assert_array_equal(small["proj_a"], big["proj_a"][:6])  # top-left slices of one matrix
  np.testing.assert_array_equal(small["proj_b"], big["proj_b"][:, :5])
  # independent of the init key (drawn from projection_seed only), so it is the same in every process
  again = reparam.init(jax.random.key(123), cfg, base)["big"]["kernel"]
  np.testing.assert_array_equal(again["proj_a"], big["proj_a"])
  grads = jax.grad(lambda ad: jnp.sum(reparam.apply(base, ad, cfg)["big"]["kernel"] ** 2))(
      jax.tree_util.tree_map(lambda v: v + 1.0, adapter)
  )
  np.testing.assert_array_equal(grads["big"]["kernel"]["proj_a"], 0.0)
  assert np.abs(grads["big"]["kernel"]["b"]).sum() > 0
  with pytest.raises(ValueError, match="projection_shape=.*smaller"):
    reparam.init(
        jax.random.key(0),
        AdapterConfig(targets=".*/kernel", method="vera", rank=R, options={"projection_shape": (6, 5)}),
        base,
    )


def test_factored_branch_equals_reparam():
  params = mc.dense_params(6, 5)["layer"]
  adapter = reparam.init(jax.random.key(1), CFG, {"layer": params})["layer"]
  cfg = AdapterConfig(targets="kernel", method="vera", rank=R, init="random")
  x = jnp.linspace(-1, 1, 18).reshape(3, 6)
  with factored.intercept(params, adapter, cfg):
    hooked = nn.Dense(5).apply({"params": params}, x)
  np.testing.assert_allclose(
      hooked, nn.Dense(5).apply({"params": reparam.apply(params, adapter, cfg)}, x), atol=1e-6
  )


def test_training_and_checkpoint(tmp_path):
  base = mc.dense_params(6, 5)
  cfg = AdapterConfig(targets="layer/kernel", method="vera", rank=R)
  mc.check_training_reduces_loss(cfg, base)
  mc.check_checkpoint_round_trip(tmp_path, base, reparam.init(jax.random.key(0), CFG, base), CFG)


def _peft_vera(layer, **kw):
  torch.manual_seed(0)
  model = peft.get_peft_model(mc.Wrap(layer), peft.VeraConfig(r=R, target_modules=["layer"], **kw))
  model.eval()
  return model, model.base_model.model.layer


def test_linear_parity_with_peft():
  torch.manual_seed(1)
  model, layer = _peft_vera(torch.nn.Linear(6, 5), init_weights=False)
  with torch.no_grad():
    layer.vera_lambda_b["default"].mul_(torch.linspace(0.5, 1.5, 5))
  params = mc.linear_params(layer)
  adapter = {
      "kernel": {
          "proj_a": jnp.asarray(mc.t2n(layer.vera_A["default"]).T),
          "proj_b": jnp.asarray(mc.t2n(layer.vera_B["default"]).T),
          "d": jnp.asarray(mc.t2n(layer.vera_lambda_d["default"])),
          "b": jnp.asarray(mc.t2n(layer.vera_lambda_b["default"])),
      }
  }
  cfg = AdapterConfig(targets="kernel", method="vera", rank=R)
  err = mc.check_linear_parity(model, params, adapter, cfg, 6)
  assert err < 1e-5


def test_init_distributions_match_peft():
  d_in, d_out, r = 512, 256, 64
  torch.manual_seed(2)
  layer = peft.get_peft_model(
      mc.Wrap(torch.nn.Linear(d_in, d_out)), peft.VeraConfig(r=r, target_modules=["layer"])
  ).base_model.model.layer
  cfg = AdapterConfig(targets="kernel", method="vera", rank=r)
  ours = reparam.init(jax.random.key(2), cfg, {"kernel": jnp.zeros((d_in, d_out))})["kernel"]
  for theirs, mine, fan_in in (
      (layer.vera_A["default"].T, ours["proj_a"], d_in),
      (layer.vera_B["default"].T, ours["proj_b"], r),
  ):
    theirs, mine = mc.t2n(theirs), np.asarray(mine)
    assert theirs.shape == mine.shape
    bound = np.sqrt(6 / fan_in)  # kaiming-uniform with gain sqrt(2), not LoRA's 1/sqrt(fan_in)
    for m in (theirs, mine):
      assert np.abs(m).max() <= bound and np.abs(m).max() > 0.98 * bound
      np.testing.assert_allclose(m.std(), bound / np.sqrt(3), rtol=0.03)
  np.testing.assert_array_equal(mc.t2n(layer.vera_lambda_b["default"]), 0.0)
  np.testing.assert_array_equal(ours["b"], 0.0)
  np.testing.assert_allclose(mc.t2n(layer.vera_lambda_d["default"]), 0.1, rtol=1e-6)
  np.testing.assert_allclose(ours["d"], 0.1, rtol=1e-6)
