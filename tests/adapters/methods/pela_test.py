"""PELA tests: Eckart-Young truncation at init, the reference's rank rule and inf-norm penalty, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from jaxpeft.adapters.methods.pela import weight_perturbation_penalty
from tests.adapters import method_checks as mc

D_IN, D_OUT = 30, 20


def _base(seed=0):
  return {
      "layer": {
          "kernel": jax.random.normal(jax.random.key(seed), (D_IN, D_OUT), jnp.float32),
          "bias": jnp.linspace(-1.0, 1.0, D_OUT),
      },
      "head": {"kernel": jax.random.normal(jax.random.key(seed + 1), (D_OUT, 4), jnp.float32)},
  }


def test_init_is_truncated_svd_split_evenly():
  base = _base()
  cfg = AdapterConfig(targets="layer/kernel", method="pela", rank=5)
  adapter = reparam.init(jax.random.key(0), cfg, base)["layer"]["kernel"]
  w = np.asarray(base["layer"]["kernel"], np.float64)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  best = (u[:, :5] * s[:5]) @ vt[:5]
  a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)
  np.testing.assert_allclose(a @ b, best, atol=1e-4)
  # the reference's split: sqrt(σ) on each side
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(s[:5]), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(s[:5]), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(a @ b - w, 2), s[5], rtol=1e-4)  # Eckart-Young error


def test_full_rank_reproduces_base_and_apply_replaces_kernel():
  base = _base()
  cfg = AdapterConfig(targets="layer/kernel", method="pela", rank=D_OUT)
  adapter = reparam.init(jax.random.key(0), cfg, base)
  np.testing.assert_allclose(
      reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"], atol=1e-5
  )
  other = _base(seed=7)  # apply ignores the base kernel: W' = a b
  lv = adapter["layer"]["kernel"]
  np.testing.assert_allclose(reparam.merge(other, adapter, cfg)["layer"]["kernel"], lv["a"] @ lv["b"], atol=1e-6)
  np.testing.assert_array_equal(reparam.apply(other, adapter, cfg)["head"]["kernel"], other["head"]["kernel"])
  with pytest.raises(ValueError, match="cannot be recovered"):
    reparam.unmerge(base, adapter, cfg)


def test_compress_ratio_rank_rule_and_param_count():
  base = _base()
  cfg = AdapterConfig(targets=".*/kernel", method="pela", options={"compress_ratio": 3})
  adapter = reparam.init(jax.random.key(0), cfg, base)
  r_layer = (D_IN * D_OUT) // (3 * (D_IN + D_OUT))  # reference ModuleLowRank._apply: 600 // 150 = 4
  r_head = (D_OUT * 4) // (3 * (D_OUT + 4))  # 80 // 72 = 1
  assert adapter["layer"]["kernel"]["a"].shape == (D_IN, r_layer) == (D_IN, 4)
  assert adapter["head"]["kernel"]["b"].shape == (r_head, 4) == (1, 4)
  assert param_count(adapter) == r_layer * (D_IN + D_OUT) + r_head * (D_OUT + 4)
  with pytest.raises(ValueError, match=r"PELA rank must be in \[1, min\(d_in, d_out\) = 4\]"):
    reparam.init(
        jax.random.key(0),
        AdapterConfig(targets="head/kernel", method="pela", options={"compress_ratio": 30}),
        base,
    )


def test_weight_perturbation_penalty_matches_reference_inf_norm():
  base = _base()
  cfg = AdapterConfig(targets=".*/kernel", method="pela", rank=3)
  adapter = reparam.init(jax.random.key(0), cfg, base)
  errors = []
  for name in ("layer", "head"):
    lv = adapter[name]["kernel"]
    # reference inf_norm: torch weights (d_out, d_in), rebuild = W_R @ W_L
    rebuild = torch.tensor(np.asarray(lv["b"]).T) @ torch.tensor(np.asarray(lv["a"]).T)
    residual = torch.norm(rebuild - torch.tensor(np.asarray(base[name]["kernel"]).T), float("inf"))
    errors.append(F.mse_loss(residual, torch.tensor(1e-3)).item())
  np.testing.assert_allclose(weight_perturbation_penalty(base, adapter, cfg), np.mean(errors), rtol=1e-5)
  with pytest.raises(ValueError, match="needs a PELA config"):
    weight_perturbation_penalty(base, adapter, AdapterConfig(targets=".*/kernel"))


def test_training_loss_falls_and_checkpoint(tmp_path):
  base = _base()
  cfg = AdapterConfig(targets="layer/kernel", method="pela", rank=4)
  adapter = reparam.init(jax.random.key(0), cfg, base)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(32, D_IN)), jnp.float32)
  lv = adapter["layer"]["kernel"]
  y = x @ (lv["a"] @ (1.5 * lv["b"])) + base["layer"]["bias"]  # reachable rank-4 target away from the init
  adapter, losses = mc.train(adapter, base, cfg, optax.adam(0.02), x, y)
  assert losses[-1] < 0.2 * losses[0]
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)
