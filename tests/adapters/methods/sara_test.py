"""SaRA: masked sparse delta, progressive reselection and the nuclear-norm term, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.methods.sara import nuclear_norm_penalty, reselect
from tests.adapters import method_checks as mc

TAU = 0.2
CFG = AdapterConfig(targets="layer/(kernel|bias)", method="sara", options={"threshold": TAU})


def _random_delta(adapter, seed=3):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(rng.normal(size=v.shape), jnp.float32) if path[-1].key == "delta" else v, adapter
  )


@pytest.fixture(scope="module")
def setup():
  base = mc.dense_params(8, 5)
  return base, reparam.init(jax.random.key(0), CFG, base)


def test_mask_and_update_are_closed_form(setup):
  base, adapter = setup
  w0 = np.asarray(base["layer"]["kernel"], np.float64)
  mask = np.abs(w0) < TAU
  np.testing.assert_array_equal(adapter["layer"]["kernel"]["mask"], mask.astype(np.float32))
  np.testing.assert_array_equal(
      adapter["layer"]["bias"]["mask"], (np.abs(np.asarray(base["layer"]["bias"])) < TAU)[None].astype(np.float32)
  )
  assert 0 < mask.sum() < mask.size
  # init is the identity; the trainable set has #{|W0| < tau} entries (+ the bias's)
  jax.tree.map(np.testing.assert_array_equal, reparam.apply(base, adapter, CFG), base)
  moving = sum(int(np.asarray(adapter["layer"][k]["mask"]).sum()) for k in ("kernel", "bias"))
  assert moving == mask.sum() + (np.abs(np.asarray(base["layer"]["bias"])) < TAU).sum()
  adapter = _random_delta(adapter)
  delta = np.asarray(adapter["layer"]["kernel"]["delta"], np.float64)
  np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], w0 + mask * delta, rtol=1e-6)
  mc.check_merge_unmerge(base, adapter, CFG)


def test_gradient_only_on_masked_entries(setup):
  base, adapter = setup
  x = jnp.linspace(-1, 1, 24).reshape(3, 8)
  grads = jax.grad(lambda ad: jnp.sum(jnp.sin(x @ reparam.apply(base, ad, CFG)["layer"]["kernel"])))(adapter)
  mask = np.asarray(adapter["layer"]["kernel"]["mask"])
  g = np.asarray(grads["layer"]["kernel"]["delta"])
  assert np.all(g[mask == 0] == 0) and np.all(g[mask == 1] != 0)
  np.testing.assert_array_equal(grads["layer"]["kernel"]["mask"], 0.0)  # frozen leaf


def test_reselect_redraws_mask_on_current_weights(setup):
  base, adapter = setup
  adapter = jax.tree.map(lambda v: v * 0.15, _random_delta(adapter))  # keeps some trained entries small
  adapter = {"layer": {k: {**v, "mask": v["mask"] / 0.15} for k, v in adapter["layer"].items()}}
  merged, fresh = reselect(base, adapter, CFG)
  w1 = np.asarray(base["layer"]["kernel"], np.float64) + np.asarray(
      adapter["layer"]["kernel"]["mask"]
  ) * np.asarray(adapter["layer"]["kernel"]["delta"])
  np.testing.assert_allclose(merged["layer"]["kernel"], w1, rtol=1e-6)
  np.testing.assert_array_equal(fresh["layer"]["kernel"]["mask"], (np.abs(w1) < TAU).astype(np.float32))
  assert not np.array_equal(fresh["layer"]["kernel"]["mask"], adapter["layer"]["kernel"]["mask"])
  np.testing.assert_array_equal(fresh["layer"]["kernel"]["delta"], 0.0)
  round_2 = _random_delta(fresh, seed=5)
  np.testing.assert_allclose(
      reparam.apply_many(base, [(CFG, adapter), (CFG, round_2)])["layer"]["kernel"],
      reparam.apply(merged, round_2, CFG)["layer"]["kernel"],
      rtol=1e-6,
  )


def test_nuclear_norm_value_and_subgradient():
  rng = np.random.default_rng(0)
  base = {
      "a": {"kernel": jnp.asarray(rng.normal(size=(7, 6)) * 0.3, jnp.float32)},
      "b": {"kernel": jnp.asarray(rng.normal(size=(6, 9)) * 0.3, jnp.float32)},
      "c": {"kernel": jnp.asarray(rng.normal(size=(2, 9)) * 0.3, jnp.float32)},
  }  # too small: skipped
  cfg = AdapterConfig(targets=".*kernel", method="sara", options={"threshold": 0.3})
  adapter = _random_delta(reparam.init(jax.random.key(0), cfg, base))
  expect, grads = 0.0, {}
  for name in ("a", "b"):
    mask = np.asarray(adapter[name]["kernel"]["mask"], np.float64)
    x = mask * (np.asarray(base[name]["kernel"], np.float64) + mask * np.asarray(adapter[name]["kernel"]["delta"]))
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    expect += s.sum()
    grads[name] = mask * (u @ vt)
  fn = lambda ad, **kw: nuclear_norm_penalty(base, ad, cfg, 0.5, min_dim=4, **kw)
  np.testing.assert_allclose(fn(adapter), 0.5 * expect, rtol=1e-5)
  g = jax.grad(fn)(adapter)
  for name in ("a", "b"):
    np.testing.assert_allclose(g[name]["kernel"]["delta"], 0.5 * grads[name], atol=1e-5)
  np.testing.assert_array_equal(g["c"]["kernel"]["delta"], 0.0)
  one = [float(jax.jit(lambda ad, k: fn(ad, rng=k))(adapter, jax.random.key(i))) for i in range(12)]
  total = float(fn(adapter))
  assert len(set(np.round(one, 4))) == 2 and np.isclose(sum(set(np.round(one, 4))), total, rtol=1e-3)
  # rank-deficient X (zero, rank one): the minimum-norm subgradient M * u1 v1^T (zero for X = 0)
  for mask in (np.zeros((7, 6)), np.outer(np.arange(7) > 2, np.arange(6) > 1).astype(float)):
    w = np.asarray(base["a"]["kernel"], np.float64)
    deficient = {
        **adapter,
        "a": {"kernel": {"mask": jnp.asarray(mask, jnp.float32), "delta": jnp.asarray(0.7 - w, jnp.float32)}},
    }
    u, s, vt = np.linalg.svd(mask * 0.7)
    expect_grad = mask * np.outer(u[:, 0], vt[0]) * (s[0] > 0)
    np.testing.assert_allclose(jax.grad(fn)(deficient)["a"]["kernel"]["delta"], 0.5 * expect_grad, atol=1e-5)
  with pytest.raises(ValueError, match="min_dim=64"):
    nuclear_norm_penalty(base, adapter, cfg, 0.5)


def test_training_reduces_loss_and_checkpoint(tmp_path, setup):
  base, adapter = setup
  mc.check_training_reduces_loss(
      AdapterConfig(targets="layer/(kernel|bias)", method="sara", options={"threshold": 0.3}), base
  )
  mc.check_checkpoint_round_trip(tmp_path, base, _random_delta(adapter), CFG)


def test_nuclear_norm_covers_linear_kernels_only_not_conv_kernels():
  """The reference regularises 2-D weights (``len(p.shape) == 2 and min(p.shape) > 64``): no conv kernels."""
  rng = np.random.default_rng(1)
  base = {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 6)) * 0.3, jnp.float32)},
      "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 6)) * 0.3, jnp.float32)},
  }  # folded (36, 6)
  cfg = AdapterConfig(
      targets=".*kernel", method="sara", options={"threshold": 0.3}, fan_in_axes=((r"conv/kernel", 3),)
  )
  adapter = _random_delta(reparam.init(jax.random.key(0), cfg, base))
  mask = np.asarray(adapter["dense"]["kernel"]["mask"], np.float64)
  x = mask * (
      np.asarray(base["dense"]["kernel"], np.float64) + mask * np.asarray(adapter["dense"]["kernel"]["delta"])
  )
  np.testing.assert_allclose(
      nuclear_norm_penalty(base, adapter, cfg, 0.5, min_dim=4), 0.5 * np.linalg.norm(x, "nuc"), rtol=1e-5
  )
  conv_only = AdapterConfig(
      targets="conv/kernel", method="sara", options={"threshold": 0.3}, fan_in_axes=((r"conv/kernel", 3),)
  )
  with pytest.raises(ValueError, match="linear-layer kernel"):
    nuclear_norm_penalty(base, {"conv": adapter["conv"]}, conv_only, 0.5, min_dim=4)
