"""RandLoRA: closed form (explicit basis sum), shared bases, inits and parity with PEFT's ``RandLoraConfig``."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import method_checks as mc

R, ALPHA = 2, 6.0


def _np_delta(leaves, d_in, d_out):
  """PEFT's pairing written as an explicit sum of rank-one terms: B column i*r+j with A_flat row i*r+j."""
  a, b, lam, gamma = (np.asarray(leaves[k], np.float64) for k in ("basis_a", "basis_b", "lam", "gamma"))
  big, num, r = b.shape
  m = np.zeros((big, a.shape[1]))
  for i in range(num):
    for j in range(r):
      jj, ii = divmod(i * r + j, num)  # row i*r+j of A_flat (flattened from (r, N))
      m += np.outer(b[:, i, j], lam[jj, ii] * a[jj] * gamma[ii])
  return ALPHA / R * (m.T if d_in <= d_out else m)


@pytest.mark.parametrize("d_in,d_out", [(5, 7), (7, 5)])
def test_closed_form_merge_unmerge_and_count(d_in, d_out):
  base = mc.dense_params(d_in, d_out)
  cfg = AdapterConfig(targets="layer/kernel", method="randlora", rank=R, alpha=ALPHA, init="random")
  adapter = reparam.init(jax.random.key(1), cfg, base)
  leaves = adapter["layer"]["kernel"]  # gamma != const, else every term shares basis_a's row space (rank r)
  leaves["gamma"] = leaves["gamma"] * (1 + jax.random.uniform(jax.random.key(2), leaves["gamma"].shape))
  num = 3  # ceil(5 / 2)
  assert leaves["basis_a"].shape == (R, 5) and leaves["basis_b"].shape == (7, num, R)
  expect = np.asarray(base["layer"]["kernel"], np.float64) + _np_delta(leaves, d_in, d_out)
  np.testing.assert_allclose(reparam.apply(base, adapter, cfg)["layer"]["kernel"], expect, atol=1e-5)
  assert np.linalg.matrix_rank(expect - np.asarray(base["layer"]["kernel"])) == 5  # full rank from rank-2 bases
  mc.check_merge_unmerge(base, adapter, cfg)
  assert mc.trainable_count(adapter, cfg) == num * R + num * 5  # N r + N n


def test_default_init_is_identity_training_and_checkpoint(tmp_path):
  base = mc.dense_params(6, 5)
  cfg = AdapterConfig(targets="layer/kernel", method="randlora", rank=R, alpha=ALPHA)
  adapter = reparam.init(jax.random.key(1), cfg, base)
  np.testing.assert_array_equal(reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"])
  mc.check_training_reduces_loss(cfg, base)
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)


def test_bases_are_shared_slices():
  base = {"small": {"kernel": jnp.zeros((4, 5))}, "big": {"kernel": jnp.zeros((9, 7))}}
  cfg = AdapterConfig(targets=".*/kernel", method="randlora", rank=R, options={"projection_shape": (9, 7)})
  adapter = reparam.init(jax.random.key(0), cfg, base)
  small, big = adapter["small"]["kernel"], adapter["big"]["kernel"]
  np.testing.assert_array_equal(small["basis_a"], big["basis_a"][:, :4])
  np.testing.assert_array_equal(small["basis_b"], big["basis_b"][:5, :2])


def _peft_randlora(layer, **kw):
  torch.manual_seed(0)
  config = peft.RandLoraConfig(r=R, randlora_alpha=ALPHA, target_modules=["layer"], **kw)
  model = peft.get_peft_model(mc.Wrap(layer), config)
  model.eval()
  return model, model.base_model.model.layer


@pytest.mark.parametrize("d_in,d_out", [(5, 7), (7, 5)])
def test_linear_parity_with_peft(d_in, d_out):
  torch.manual_seed(1)
  model, layer = _peft_randlora(torch.nn.Linear(d_in, d_out))
  with torch.no_grad():  # move the trained vectors away from their (zero-update) init
    layer.randlora_lambda["default"].copy_(torch.randn_like(layer.randlora_lambda["default"]))
    layer.randlora_gamma["default"].mul_(1 + torch.rand_like(layer.randlora_gamma["default"]))
  num = layer.num_bases
  adapter = {
      "kernel": {
          "basis_a": jnp.asarray(mc.t2n(layer.randlora_A["default"])[:, 0, :]),
          "basis_b": jnp.asarray(mc.t2n(layer.randlora_B["default"])[:, :num, :]),
          "lam": jnp.asarray(mc.t2n(layer.randlora_lambda["default"])),
          "gamma": jnp.asarray(mc.t2n(layer.randlora_gamma["default"])),
      }
  }
  cfg = AdapterConfig(targets="kernel", method="randlora", rank=R, alpha=ALPHA)
  want = reparam.init(jax.random.key(0), cfg, mc.linear_params(layer))["kernel"]
  assert {k: v.shape for k, v in want.items()} == {k: v.shape for k, v in adapter["kernel"].items()}
  assert mc.check_linear_parity(model, mc.linear_params(layer), adapter, cfg, d_in) < 1e-5


@pytest.mark.parametrize("basis,kw", [("dense", {}), ("sparse", {"sparse": True})])
def test_init_distributions_match_peft(basis, kw):
  d_in, d_out, r = 96, 128, 8
  torch.manual_seed(2)
  config = peft.RandLoraConfig(r=r, target_modules=["layer"], **kw)
  layer = peft.get_peft_model(mc.Wrap(torch.nn.Linear(d_in, d_out)), config).base_model.model.layer
  cfg = AdapterConfig(targets="kernel", method="randlora", rank=r, options={"basis": basis})
  ours = reparam.init(jax.random.key(2), cfg, {"kernel": jnp.zeros((d_in, d_out))})["kernel"]
  np.testing.assert_array_equal(mc.t2n(layer.randlora_lambda["default"]), 0.0)
  np.testing.assert_array_equal(ours["lam"], 0.0)
  np.testing.assert_allclose(mc.t2n(layer.randlora_gamma["default"]), 1 / 96, rtol=1e-6)
  np.testing.assert_allclose(ours["gamma"], 1 / 96, rtol=1e-6)
  for theirs, mine in (
      (layer.randlora_A["default"][:, 0], ours["basis_a"]),
      (layer.randlora_B["default"], ours["basis_b"]),
  ):
    theirs, mine = mc.t2n(theirs), np.asarray(mine)
    assert theirs.shape == mine.shape
    for m in (theirs, mine):
      np.testing.assert_allclose(m.std(ddof=1), 1.0, rtol=1e-2)  # both divided by their sample std
      if basis == "dense":  # uniform scaled to unit std: support +-sqrt(3)
        assert np.abs(m).max() <= np.sqrt(3) * 1.02 and np.abs(m).max() > 0.9 * np.sqrt(3)
      else:  # ternary, P(-1) = P(+1) = 1/6 (sparsity 3)
        vals = np.unique(np.round(m, 3))
        assert len(vals) == 3
        np.testing.assert_allclose(np.mean(m != 0), 1 / 3, atol=0.05)
