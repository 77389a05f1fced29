"""Singular-value fine-tuning (CLIP-SVD) tests: the reference's U diag(σ) Vᵀ, exact identity at init, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import adapter_value_and_grad, optimizer_labels, param_count
from tests.adapters import method_checks as mc
from tests.adapters import tiny_models as tm

D_IN, D_OUT = 6, 8
CFG = AdapterConfig(targets="layer/kernel", method="svd_ft")


def _base():
  return {
      "layer": {
          "kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT), jnp.float32),
          "bias": jnp.linspace(-1.0, 1.0, D_OUT),
      }
  }


class _Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, name="layer")(x)


@pytest.fixture(scope="module")
def setup():
  base = _base()
  adapter = reparam.init(jax.random.key(1), CFG, base)
  lv = adapter["layer"]["kernel"]
  lv = {**lv, "s": lv["s"] * jnp.linspace(0.5, 1.5, lv["s"].shape[0])}
  return base, {"layer": {"kernel": lv}}


def test_init_is_exact_identity_and_svd_reproduces_base():
  base = _base()
  mc.check_svd_init(base, reparam.init(jax.random.key(1), CFG, base), CFG)


def test_matches_reference_svd_linear(setup):
  """The reference ``SVD_Linear``: ``fc_U(vector_S * fc_V(x))`` with fc_V.weight = Vᵀ, fc_U.weight = U, bias on fc_U."""
  base, adapter = setup
  lv = {k: np.asarray(v, np.float32) for k, v in adapter["layer"]["kernel"].items()}
  n = lv["s"].shape[0]
  fc_v, fc_u = torch.nn.Linear(D_IN, n, bias=False), torch.nn.Linear(n, D_OUT)
  x = np.random.default_rng(0).normal(size=(4, D_IN)).astype(np.float32)
  with torch.no_grad():
    fc_v.weight.copy_(torch.tensor(lv["u"].T))
    fc_u.weight.copy_(torch.tensor(lv["vt"].T))
    fc_u.bias.copy_(torch.tensor(np.asarray(base["layer"]["bias"])))
    expect = fc_u(torch.tensor(lv["s"])[None] * fc_v(torch.tensor(x))).numpy()
  ours = _Model().apply({"params": reparam.apply(base, adapter, CFG)}, x)
  np.testing.assert_allclose(ours, expect, rtol=1e-5, atol=1e-5)
  with factored.intercept(base, adapter, CFG):
    hooked = _Model().apply({"params": base}, x)
  np.testing.assert_allclose(hooked, expect, rtol=1e-5, atol=1e-5)
  merged = reparam.merge(base, adapter, CFG)
  np.testing.assert_allclose(
      reparam.unmerge(merged, adapter, CFG)["layer"]["kernel"], base["layer"]["kernel"], atol=1e-5
  )


def test_param_count_training_and_checkpoint(tmp_path):
  base = _base()
  adapter = reparam.init(jax.random.key(3), CFG, base)
  labels = optimizer_labels(adapter, CFG)
  assert labels["layer"]["kernel"] == {"u": "frozen", "vt": "frozen", "s0": "frozen", "s": "trainable"}
  n = min(D_IN, D_OUT)
  assert adapter["layer"]["kernel"]["s"].size == n
  assert param_count(adapter) == n + n * (D_IN + D_OUT + 1)

  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, D_IN)), jnp.float32)
  u, s, vt = np.linalg.svd(np.asarray(base["layer"]["kernel"]), full_matrices=False)
  y = x @ ((u * (s * np.linspace(0.2, 2.0, n))) @ vt) + base["layer"]["bias"]  # reachable: new singular values
  _, grads = adapter_value_and_grad(mc.dense_loss, CFG)(adapter, base, x, y)
  for key, g in traverse_util.flatten_dict(grads).items():
    if key[-1] != "s":
      np.testing.assert_array_equal(g, 0.0)
  adapter, losses = mc.train(adapter, base, CFG, mc.adapter_adam(0.1, adapter, CFG), x, y, steps=60)
  assert losses[-1] < 0.1 * losses[0]
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, CFG)


def test_dense_general_fold_and_errors():
  base = tm.init_params(tm.TinyTransformer(), tm.tokens())
  cfg = AdapterConfig(targets="out/kernel", method="svd_ft", fan_in_axes=tm.ATTENTION_FAN_IN)
  adapter = reparam.init(jax.random.key(0), cfg, base)
  assert adapter["out"]["kernel"]["u"].shape == (tm.HEADS * tm.HEAD_DIM, tm.WIDTH)
  np.testing.assert_array_equal(reparam.apply(base, adapter, cfg)["out"]["kernel"], base["out"]["kernel"])
  with pytest.raises(ValueError, match="fan_in_axes=0"):
    reparam.init(jax.random.key(0), AdapterConfig(targets="layer/bias", method="svd_ft"), _base())
  with pytest.raises(ValueError, match="only init='default'"):
    reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", method="svd_ft", init="pissa"), _base())
