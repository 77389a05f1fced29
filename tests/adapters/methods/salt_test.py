"""SALT tests: the reference's forward re-done in numpy, exact identity at init, init bounds vs torch, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from jaxpeft.adapters.methods.salt import regularizer
from tests.adapters import method_checks as mc
from tests.adapters import tiny_models as tm

D_IN, D_OUT, R, RATIO = 9, 7, 2, 0.45  # n = 7, k = floor(0.45 * 7) = 3
N, K = 7, 3
CFG = AdapterConfig(targets="layer/kernel", method="salt", rank=R, options={"ratio": RATIO})


def _base():
  return {
      "layer": {
          "kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT), jnp.float32),
          "bias": jnp.linspace(-1.0, 1.0, D_OUT),
      }
  }


@pytest.fixture(scope="module")
def setup():
  base = _base()
  adapter = reparam.init(jax.random.key(1), CFG, base)
  leaves = dict(adapter["layer"]["kernel"])
  keys = jax.random.split(jax.random.key(2), 3)
  leaves["scale"] = 1.0 + 0.5 * jax.random.normal(keys[0], (K,))
  # a large negative shift on the last top value, so ReLU clips a diagonal entry as well
  leaves["shift"] = jnp.array([0.2, -0.1, -50.0])
  leaves["y"] = jax.random.normal(keys[1], (R, N - K))
  return base, {"layer": {"kernel": leaves}}


def _reference_weight(leaves):
  """``SALTLinear.forward``'s weight in PyTorch orientation, from the reference's U, S, Vt (= our vt.T, s, u.T)."""
  lv = {k: np.asarray(v, np.float64) for k, v in leaves.items()}
  u_ref, s, vt_ref = lv["vt"].T, lv["s"], lv["u"].T
  new_s = np.diag(s)
  new_s[:K, :K] = np.diag(lv["scale"] * s[:K] + lv["shift"])
  new_s[K:, K:] += lv["x"] @ lv["y"]
  return u_ref @ np.maximum(new_s, 0.0) @ vt_ref, new_s


def test_init_is_exact_identity_and_svd_reproduces_base():
  base = _base()
  adapter = reparam.init(jax.random.key(1), CFG, base)
  lv = adapter["layer"]["kernel"]
  assert lv["scale"].shape == (K,) and lv["x"].shape == (N - K, R) and lv["y"].shape == (R, N - K)
  mc.check_svd_init(base, adapter, CFG)


def test_apply_matches_reference_forward(setup):
  base, adapter = setup
  w_ref, core = _reference_weight(adapter["layer"]["kernel"])
  assert (core[K:, K:] < 0).any() and core[K - 1, K - 1] < 0  # the ReLU is exercised
  np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], w_ref.T, rtol=1e-5, atol=1e-5)


def test_merge_equals_branch_mode_unmerge_restores_and_regularizer(setup):
  base, adapter = setup
  mc.check_factored_equals_merged(base, adapter, CFG)
  mc.check_merge_unmerge(base, adapter, CFG)
  lv = {k: np.asarray(v, np.float64) for k, v in adapter["layer"]["kernel"].items()}
  top = lv["s"][:K]
  expect = np.linalg.norm(lv["scale"] * top + lv["shift"] - top) + np.linalg.norm(lv["x"] @ lv["y"])
  np.testing.assert_allclose(regularizer(adapter), expect, rtol=1e-5)


def test_x_init_matches_torch_kaiming_with_ignored_a():
  base = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (1200, 1100), jnp.float32)}}
  r = 16
  cfg = AdapterConfig(targets="layer/kernel", method="salt", rank=r, options={"ratio": 0.1})
  x = np.asarray(reparam.init(jax.random.key(1), cfg, base)["layer"]["kernel"]["x"])
  torch.manual_seed(0)
  ref = torch.nn.init.kaiming_uniform_(
      torch.empty(1100 - 110, r), a=np.sqrt(20), mode="fan_in", nonlinearity="relu"
  ).numpy()
  assert x.shape == ref.shape
  bound = np.sqrt(6.0 / r)
  assert np.abs(x).max() <= bound and np.abs(ref).max() <= bound
  np.testing.assert_allclose(np.abs(x).max(), np.abs(ref).max(), rtol=0.01)
  np.testing.assert_allclose(x.std(), ref.std(), rtol=0.02)


def test_param_count_training_and_checkpoint(tmp_path):
  base = _base()
  adapter = reparam.init(jax.random.key(3), CFG, base)
  trainable = mc.trainable_count(adapter, CFG)
  assert trainable == 2 * K + 2 * R * (N - K)
  assert param_count(adapter) - trainable == N * (D_IN + D_OUT + 1)

  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, D_IN)), jnp.float32)
  y = jnp.sin(x @ jnp.ones((D_IN, D_OUT)))
  trained, losses = mc.train(adapter, base, CFG, mc.adapter_adam(0.05, adapter, CFG), x, y)
  assert losses[-1] < 0.7 * losses[0]
  for name in ("u", "s", "vt"):  # frozen factors never move
    np.testing.assert_array_equal(trained["layer"]["kernel"][name], adapter["layer"]["kernel"][name])
  mc.check_checkpoint_round_trip(tmp_path, base, trained, CFG)


def test_stacked_layers_and_regularizer_sum():
  base = tm.init_params(tm.ScannedMLP(), jnp.ones((2, tm.WIDTH)))
  cfg = AdapterConfig(targets="layers/dense/kernel", method="salt", rank=2, stacked_axes={"layers/.*": 1})
  adapter = reparam.init(jax.random.key(0), cfg, base)
  lv = adapter["layers"]["dense"]["kernel"]
  assert lv["u"].shape == (3, tm.WIDTH, tm.WIDTH) and lv["scale"].shape == (3, 1)
  np.testing.assert_array_equal(
      reparam.apply(base, adapter, cfg)["layers"]["dense"]["kernel"], base["layers"]["dense"]["kernel"]
  )
  lv = {**lv, "shift": jnp.arange(3.0).reshape(3, 1), "y": jnp.ones_like(lv["y"])}
  expect = sum(abs(i) + np.linalg.norm(np.asarray(lv["x"][i]) @ np.asarray(lv["y"][i])) for i in range(3))
  np.testing.assert_allclose(regularizer({"layers": {"dense": {"kernel": lv}}}), expect, rtol=1e-5)


def test_bad_options():
  with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
    reparam.init(
        jax.random.key(0), AdapterConfig(targets="layer/kernel", method="salt", options={"ratio": 1.5}), _base()
    )
  with pytest.raises(ValueError, match="Unknown options"):
    reparam.init(
        jax.random.key(0),
        AdapterConfig(targets="layer/kernel", method="salt", options={"ratio_salt": 0.5}),
        _base(),
    )
