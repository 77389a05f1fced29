"""VPT (shallow / deep) through module hooks, against the numpy forward pass of the tiny transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import module_hooks, reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import module_hook_checks as mh

P = 3
DEEP = AdapterConfig(targets=r"block_\d+/ln1/scale", method="vpt", rank=P, options={"patch_size": 2})
SHALLOW = AdapterConfig(targets=r"block_0/ln1/scale", method="vpt", rank=P, options={"patch_size": 2})


@pytest.mark.parametrize("config", [SHALLOW, DEEP], ids=["shallow", "deep"])
def test_vpt_equals_numpy_forward(config):
  model, x, params = mh.model_and_input()
  adapter = reparam.init(jax.random.key(1), config, params)
  prompts = {i: mh.prompt_at(adapter, f"block_{i}/ln1/scale") for i in range(mh.DEPTH) if f"block_{i}" in adapter}

  def block_in(i, x):
    if i not in prompts:
      return x
    p = np.broadcast_to(prompts[i], x.shape[:-2] + prompts[i].shape)
    rest = x[..., 1:, :] if i == 0 else x[..., 1 + P :, :]  # insert before block 0, replace afterwards
    return np.concatenate([x[..., :1, :], p, rest], axis=-2)

  expect = mh.np_forward(params, x, block_in=block_in)
  assert not np.allclose(expect, mh.np_forward(params, x), atol=1e-3)
  np.testing.assert_allclose(mh.hooked_apply(model, params, adapter, config, x), expect, rtol=1e-5, atol=1e-5)
  # two forward passes inside one block: each inserts once
  with module_hooks.intercept(params, adapter, config):
    twice = [model.apply({"params": params}, x) for _ in range(2)]
  np.testing.assert_allclose(twice[1], expect, rtol=1e-5, atol=1e-5)
  assert sum(v.size for v in jax.tree.leaves(adapter)) == len(prompts) * P * mh.D


def test_vpt_init_bound():
  params = {"block": {"ln": {"scale": jnp.ones((64,))}}}
  prompt = reparam.init(
      jax.random.key(0), AdapterConfig(targets="block/ln/scale", method="vpt", rank=500), params
  )["block"]["ln"]["scale"]["prompt"]
  bound = np.sqrt(6.0 / (3 * 16 * 16 + 64))  # KMnP/vpt, patch 16
  assert 0.99 * bound < np.abs(prompt).max() <= bound


def test_training_and_checkpoint(tmp_path):
  model, x, params = mh.model_and_input()
  mh.check_training_reduces_loss(model, x, params, DEEP, lr=1e-1)
  mh.check_checkpoint_round_trip(tmp_path, model, x, params, reparam.init(jax.random.key(1), DEEP, params), DEEP)


def test_errors():
  _, _, params = mh.model_and_input(text=True)
  with pytest.raises(ValueError, match="VPT targets a 1-D leaf"):
    reparam.init(jax.random.key(0), AdapterConfig(targets=r"block_0/q/kernel", method="vpt"), params)
