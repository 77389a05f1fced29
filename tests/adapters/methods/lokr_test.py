"""LoKr: PEFT's factorization rule, the Kronecker closed form, inits and parity with ``LoKrConfig``."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.methods.lokr import factorization
from tests.adapters import method_checks as mc

ALPHA = 3.0


def test_factorization_matches_peft():
  for dim in (1, 2, 7, 12, 16, 96, 127, 128, 256, 768, 1000):
    for factor in (-1, 2, 4, 8, 5):
      assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("rank,decompose_both,full", [(1, True, False), (2, False, True)])
def test_closed_form_merge_unmerge_and_count(rank, decompose_both, full):
  base = mc.dense_params(12, 8)  # c_in = 3*4, c_out = 2*4
  cfg = AdapterConfig(
      targets="layer/kernel",
      method="lokr",
      rank=rank,
      alpha=ALPHA,
      init="random",
      options={"decompose_both": decompose_both},
  )
  adapter = reparam.init(jax.random.key(1), cfg, base)
  leaves = {k: np.asarray(v, np.float64) for k, v in adapter["layer"]["kernel"].items()}
  assert ("w2" in leaves) == full and ("w1" in leaves) == (not decompose_both)
  w1 = leaves["w1"] if "w1" in leaves else leaves["w1_a"] @ leaves["w1_b"]
  w2 = leaves["w2"] if "w2" in leaves else leaves["w2_a"] @ leaves["w2_b"]
  assert w1.shape == (3, 2) and w2.shape == (4, 4)
  expect = np.asarray(base["layer"]["kernel"], np.float64) + ALPHA / rank * np.kron(w1, w2)
  np.testing.assert_allclose(reparam.apply(base, adapter, cfg)["layer"]["kernel"], expect, atol=1e-6)
  mc.check_merge_unmerge(base, adapter, cfg)
  count = (rank * (2 + 3) if decompose_both else 2 * 3) + (4 * 4 if full else rank * (4 + 4))
  assert mc.trainable_count(adapter, cfg) == count


def test_default_init_is_identity_training_and_checkpoint(tmp_path):
  base = mc.dense_params(12, 8)
  cfg = AdapterConfig(targets="layer/kernel", method="lokr", rank=1, alpha=ALPHA)
  adapter = reparam.init(jax.random.key(1), cfg, base)
  np.testing.assert_array_equal(reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"])
  mc.check_training_reduces_loss(cfg, base)
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)


def test_spatial_axes_must_fit_the_leaf():
  refusal = r"lokr adapts .* conv kernel \(window axes, c_in, c_out\) with fan_in_axes = spatial_axes \+ 1"
  with pytest.raises(ValueError, match=refusal):
    reparam.init(
        jax.random.key(0),
        AdapterConfig(targets="kernel", method="lokr", options={"spatial_axes": 2}),
        {"kernel": jnp.zeros((4, 4))},
    )


def _peft_lokr(layer, rank, decompose_both, init_weights=False):
  torch.manual_seed(0)
  config = peft.LoKrConfig(
      r=rank, alpha=ALPHA, target_modules=["layer"], init_weights=init_weights, decompose_both=decompose_both
  )
  model = peft.get_peft_model(mc.Wrap(layer), config)
  model.eval()
  return model, model.base_model.model.layer


def _adapter(layer, rank, conv_window=None):
  """PEFT LoKr factors -> ours (transposed; conv: torch (d, kh, kw) order -> Flax (kh, kw, d) fold)."""

  def get(name):
    return mc.t2n(getattr(layer, name)["default"]) if "default" in getattr(layer, name) else None

  def input_side(p):  # (rows, d[, kh, kw]) or (rows, d*kh*kw) -> (kh*kw*d, rows)
    if conv_window is None:
      return p.T
    p = p.reshape(p.shape[0], -1, *conv_window)
    return p.transpose(2, 3, 1, 0).reshape(-1, p.shape[0])

  out = {}
  if get("lokr_w1") is not None:
    out["w1"] = get("lokr_w1").T
  else:
    out["w1_a"], out["w1_b"] = get("lokr_w1_b").T, get("lokr_w1_a").T
  if get("lokr_w2") is not None:
    out["w2"] = input_side(get("lokr_w2"))
  else:
    out["w2_a"], out["w2_b"] = input_side(get("lokr_w2_b")), get("lokr_w2_a").T
  return {"kernel": {k: jnp.asarray(v) for k, v in out.items()}}


@pytest.mark.parametrize("rank,decompose_both", [(1, True), (2, False)])
def test_linear_parity_with_peft(rank, decompose_both):
  torch.manual_seed(1)
  model, layer = _peft_lokr(torch.nn.Linear(12, 8), rank, decompose_both)
  cfg = AdapterConfig(
      targets="kernel", method="lokr", rank=rank, alpha=ALPHA, options={"decompose_both": decompose_both}
  )
  adapter = _adapter(layer, rank)
  assert set(adapter["kernel"]) == set(reparam.init(jax.random.key(0), cfg, mc.linear_params(layer))["kernel"])
  assert mc.check_linear_parity(model, mc.linear_params(layer), adapter, cfg, 12) < 1e-5


@pytest.mark.parametrize("rank", [1, 2])
def test_conv2d_parity_with_peft(rank):
  torch.manual_seed(2)
  model, layer = _peft_lokr(torch.nn.Conv2d(4, 6, 3, padding=1), rank, False)
  cfg = AdapterConfig(
      targets="kernel",
      method="lokr",
      rank=rank,
      alpha=ALPHA,
      fan_in_axes={"kernel": 3},
      options={"spatial_axes": 2},
  )
  adapter = _adapter(layer, rank, conv_window=(3, 3))
  assert set(adapter["kernel"]) == set(reparam.init(jax.random.key(0), cfg, mc.conv_params(layer))["kernel"])
  assert mc.check_conv_parity(model, mc.conv_params(layer), adapter, cfg, 4) < 1e-5


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_init_distributions_match_peft(init):
  r = 4  # Linear(1024, 512): c_in = 32*32, c_out = 16*32 -> w1 full (16x32), w2 = w2_a @ w2_b (r < 16)
  torch.manual_seed(3)
  config = peft.LoKrConfig(r=r, alpha=8, target_modules=["layer"], init_weights=init)
  layer = peft.get_peft_model(mc.Wrap(torch.nn.Linear(1024, 512)), config).base_model.model.layer
  cfg = AdapterConfig(targets="kernel", method="lokr", rank=r, alpha=8, init="default" if init is True else init)
  ours = reparam.init(jax.random.key(3), cfg, {"kernel": jnp.zeros((1024, 512))})["kernel"]
  theirs = {k: v.T for k, v in _adapter(layer, r)["kernel"].items()}  # back to PEFT's orientation for fan-ins
  assert set(ours) == {"w1", "w2_a", "w2_b"} == set(theirs)
  zero = {"w1"} if init is True else {"w2_a"}
  fan_in = {"w1": 32, "w2_a": 32, "w2_b": r}
  for name in ours:
    for m in (np.asarray(ours[name]), np.asarray(theirs[name])):
      if name in zero:
        np.testing.assert_array_equal(m, 0.0)
        continue
      bound = 1 / np.sqrt(fan_in[name])
      assert np.abs(m).max() <= bound and np.abs(m).max() > 0.9 * bound
      np.testing.assert_allclose(m.std(), bound / np.sqrt(3), rtol=0.1)
