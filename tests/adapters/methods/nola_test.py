"""NOLA: the paper's formula in numpy from the regenerated bases, base distributions, seeds and training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.methods.nola import nola_bases
from jaxpeft.adapters.selection import select_targets
from tests.adapters import method_checks as mc

R, ALPHA, KA, KB = 3, 6.0, 5, 4
CFG = AdapterConfig(
    targets="layer/kernel",
    method="nola",
    rank=R,
    alpha=ALPHA,
    init="random",
    options={"num_basis_a": KA, "num_basis_b": KB},
)


def test_formula_merge_unmerge_and_count():
  base = mc.dense_params(6, 5)
  adapter = reparam.init(jax.random.key(1), CFG, base)
  leaves = adapter["layer"]["kernel"]
  (target,) = select_targets(CFG, base)
  a0, basis_a, basis_b = (np.asarray(m, np.float64) for m in nola_bases(leaves["seed"], target))
  assert a0.shape == (6, R) and basis_a.shape == (KA, 6, R) and basis_b.shape == (KB, R, 5)
  alpha, beta = np.asarray(leaves["alpha"], np.float64), np.asarray(leaves["beta"], np.float64)
  a = a0 + sum(alpha[i] * basis_a[i] for i in range(KA))
  b = sum(beta[j] * basis_b[j] for j in range(KB))
  expect = np.asarray(base["layer"]["kernel"], np.float64) + ALPHA / R * a @ b
  np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], expect, atol=1e-5)
  mc.check_merge_unmerge(base, adapter, CFG)
  assert mc.trainable_count(adapter, CFG) == KA + KB  # independent of shape and rank


def test_basis_distributions_and_seeds():
  d_in, d_out, r, k = 256, 64, 8, 16
  base = {"layers": {"kernel": jnp.zeros((2, d_in, d_out))}}
  cfg = AdapterConfig(
      targets=".*", method="nola", rank=r, stacked_axes={".*": 1}, options={"num_basis_a": k, "num_basis_b": k}
  )
  adapter = reparam.init(jax.random.key(0), cfg, base)["layers"]["kernel"]
  (target,) = select_targets(cfg, base)
  seeds = np.asarray(adapter["seed"])
  assert seeds.shape == (2,) and seeds[0] != seeds[1] and np.all(seeds == np.round(seeds))  # one seed per layer
  a0, basis_a, basis_b = (np.asarray(m) for m in nola_bases(jnp.asarray(seeds[0]), target))
  for m, bound in ((a0, 1 / np.sqrt(d_in)), (basis_a, 1 / np.sqrt(k)), (basis_b, 1 / np.sqrt(k))):
    assert np.abs(m).max() <= bound and np.abs(m).max() > 0.99 * bound
    np.testing.assert_allclose(m.std(), bound / np.sqrt(3), rtol=0.03)
  np.testing.assert_array_equal(nola_bases(jnp.asarray(seeds[0]), target)[1], basis_a)  # regenerated exactly
  assert not np.allclose(nola_bases(jnp.asarray(seeds[1]), target)[1], basis_a)
  np.testing.assert_array_equal(adapter["alpha"], 0.0)
  np.testing.assert_array_equal(adapter["beta"], 0.0)
  np.testing.assert_array_equal(
      reparam.apply(base, {"layers": {"kernel": adapter}}, cfg)["layers"]["kernel"], base["layers"]["kernel"]
  )


def test_gradients_reach_beta_at_init_and_not_the_seed():
  base = mc.dense_params(6, 5)
  cfg = AdapterConfig(
      targets="layer/kernel", method="nola", rank=R, options={"num_basis_a": KA, "num_basis_b": KB}
  )
  adapter = reparam.init(jax.random.key(1), cfg, base)
  grads = jax.grad(lambda ad: jnp.sum(reparam.apply(base, ad, cfg)["layer"]["kernel"] ** 3))(adapter)
  g = grads["layer"]["kernel"]
  assert float(g["seed"]) == 0.0
  assert np.abs(g["beta"]).sum() > 0
  np.testing.assert_array_equal(g["alpha"], 0.0)  # B = 0 at init


def test_factored_training_and_checkpoint(tmp_path):
  params = mc.dense_params(6, 5)
  adapter = reparam.init(jax.random.key(1), CFG, params)
  cfg = AdapterConfig(
      targets="kernel",
      method="nola",
      rank=R,
      alpha=ALPHA,
      init="random",
      options={"num_basis_a": KA, "num_basis_b": KB},
  )
  x = jnp.linspace(-1, 1, 18).reshape(3, 6)
  with factored.intercept(params["layer"], adapter["layer"], cfg):
    hooked = nn.Dense(5).apply({"params": params["layer"]}, x)
  merged = reparam.apply(params["layer"], adapter["layer"], cfg)
  np.testing.assert_allclose(hooked, nn.Dense(5).apply({"params": merged}, x), atol=1e-5)
  train_cfg = AdapterConfig(
      targets="layer/kernel", method="nola", rank=R, alpha=ALPHA, options={"num_basis_a": 16, "num_basis_b": 16}
  )
  mc.check_training_reduces_loss(train_cfg, params)
  mc.check_checkpoint_round_trip(tmp_path, params, adapter, CFG)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="num_basis_a must be a positive int"):
    reparam.init(
        jax.random.key(0),
        AdapterConfig(targets="kernel", method="nola", options={"num_basis_a": 0}),
        {"kernel": jnp.zeros((3, 2))},
    )
