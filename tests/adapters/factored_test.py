"""Activation-hook (factored) mode: same outputs as the reparameterized mode; dropout on the branch only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import tiny_models as tm

TARGETS = r"(dense|query|out)/kernel"


@pytest.fixture(scope="module")
def base():
  return tm.init_params(tm.TinyTransformer(), tm.tokens())


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "hydra"])
def test_factored_equals_reparameterized(base, method):
  """ia3 and hydra also adapt the (DenseGeneral-shaped) biases: the hook adds ``apply_bias(b) - b``."""
  model, x = tm.TinyTransformer(), tm.tokens()
  cfg = AdapterConfig(
      targets=TARGETS, method=method, rank=2, alpha=3.0, fan_in_axes=tm.ATTENTION_FAN_IN, dropout=0.3
  )
  adapter = reparam.init(jax.random.key(1), cfg, base)
  leaves, treedef = jax.tree.flatten(adapter)  # perturb every leaf so that every term matters
  keys = jax.random.split(jax.random.key(2), len(leaves))
  adapter = treedef.unflatten([v + 0.2 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])

  @jax.jit
  def hooked(adapter, params):
    with factored.intercept(params, adapter, cfg):  # deterministic: no dropout
      return model.apply({"params": params}, x)

  expect = model.apply({"params": reparam.apply(base, adapter, cfg)}, x)
  assert not np.allclose(expect, model.apply({"params": base}, x), atol=1e-3)
  np.testing.assert_allclose(hooked(adapter, base), expect, rtol=1e-5, atol=1e-5)


def test_dropout_acts_on_the_branch_only():
  model, x = nn.Dense(6), jnp.linspace(-1.0, 1.0, 40).reshape(8, 5)
  params = model.init(jax.random.key(0), x)["params"]
  cfg = AdapterConfig(targets="kernel", rank=2, init="random", dropout=0.5)
  adapter = reparam.init(jax.random.key(1), cfg, params)

  def run(adapter, key):
    with factored.intercept(params, adapter, cfg, rng=key, deterministic=False):
      return model.apply({"params": params}, x)

  base_y = model.apply({"params": params}, x)
  zero_b = jax.tree.map(jnp.zeros_like, adapter)
  np.testing.assert_array_equal(run(zero_b, jax.random.key(2)), base_y)  # base path never dropped
  ys = jax.jit(jax.vmap(lambda k: run(adapter, k)))(jax.random.split(jax.random.key(3), 4000))
  ab = adapter["kernel"]
  branch = np.asarray(ys) - np.asarray(base_y)
  # each example's branch is s * (mask * x / (1 - p)) a b with a per-example, per-feature Bernoulli mask
  assert np.unique(np.round(branch[:, 0, 0], 5)).size > 4
  mean_branch = branch.mean(0)
  np.testing.assert_allclose(
      mean_branch,
      4.0 * np.asarray(x) @ np.asarray(ab["a"]) @ np.asarray(ab["b"]),
      atol=0.05 * np.abs(mean_branch).max(),
  )


def test_errors(base):
  model, x = tm.TinyTransformer(), tm.tokens()
  cfg = AdapterConfig(targets=r"(embed/embedding|dense/kernel)", rank=2)
  adapter = reparam.init(jax.random.key(1), cfg, base)
  with pytest.raises(ValueError, match="embed/embedding: the activation-hook mode supports Dense"):
    with factored.intercept(base, adapter, cfg):
      model.apply({"params": base}, x)
  cfg = AdapterConfig(targets=r"dense/kernel", rank=2, dropout=0.1)
  adapter = reparam.init(jax.random.key(1), cfg, base)
  with pytest.raises(ValueError, match="needs an rng key"):
    with factored.intercept(base, adapter, cfg, deterministic=False):
      pass
  with pytest.raises(ValueError, match=r"Targets \['dense/kernel'\] were not called"):
    with factored.intercept(base, adapter, cfg):
      pass
  scanned = tm.init_params(tm.ScannedMLP(), jnp.ones((1, tm.WIDTH)))
  cfg = AdapterConfig(targets=".*kernel", stacked_axes={".*": 1}, rank=2)
  with pytest.raises(ValueError, match="Stacked"):
    with factored.intercept(scanned, reparam.init(jax.random.key(0), cfg, scanned), cfg):
      pass
