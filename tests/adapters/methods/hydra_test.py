"""Hydra tests: closed form in numpy, the authors' two-branch forward in torch, merge/unmerge, init, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import method_checks as mc

D_IN, D_OUT, R, ALPHA = 7, 5, 3, 4.5
CFG = AdapterConfig(targets="layer/kernel", method="hydra", rank=R, alpha=ALPHA)
S = ALPHA / R
WITH_BIAS = pytest.mark.parametrize("bias", [True, False])


def _base(bias=True):
  layer = {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT), jnp.float32)}
  if bias:
    layer["bias"] = jnp.linspace(-1.0, 1.0, D_OUT)
  return {"layer": layer}


def _trained_like(base, seed=5):
  """Non-zero up-projections and branch biases, so every term of the update matters."""
  leaves = dict(reparam.init(jax.random.key(1), CFG, base)["layer"]["kernel"])
  for i, name in enumerate(sorted(set(leaves) - {"a_p", "a_s"})):
    leaves[name] = 0.3 * jax.random.normal(jax.random.key(seed + i), leaves[name].shape)
  return {"layer": {"kernel": leaves}}


def _np(adapter):
  return {k: np.asarray(v, np.float64) for k, v in adapter["layer"]["kernel"].items()}


class _Reference(torch.nn.Module):
  """The authors' ``Hydra_layer`` pair around a Linear: ``fc(x) + par(x) + seq(fc(x))`` (vtab1k/hydra.py)."""

  def __init__(self, w, b, lv):
    super().__init__()
    bias = b is not None
    self.fc = torch.nn.Linear(D_IN, D_OUT, bias=bias)
    self.par = [torch.nn.Linear(D_IN, R, bias=bias), torch.nn.Linear(R, D_OUT, bias=bias)]
    self.seq = [torch.nn.Linear(D_OUT, R, bias=bias), torch.nn.Linear(R, D_OUT, bias=bias)]
    with torch.no_grad():
      self.fc.weight.copy_(torch.tensor(w.T))
      layers = dict(zip(("a_p", "b_p", "a_s", "b_s"), self.par + self.seq))
      for name, layer in layers.items():
        layer.weight.copy_(torch.from_numpy(lv[name].T.astype(np.float32)))
      if bias:
        self.fc.bias.copy_(torch.tensor(b))
        for name, layer in zip(("c_p", "d_p", "c_s", "d_s"), layers.values()):
          layer.bias.copy_(torch.from_numpy(lv[name].astype(np.float32)))

  def forward(self, x):
    h = self.fc(x)
    return h + S * self.par[1](self.par[0](x)) + S * self.seq[1](self.seq[0](h))


def test_init_is_identity_and_xavier_bounds():
  base = {"layer": {"kernel": jnp.zeros((512, 256), jnp.float32)}}
  cfg = AdapterConfig(targets="layer/kernel", method="hydra", rank=64, alpha=64.0)
  adapter = reparam.init(jax.random.key(3), cfg, base)["layer"]["kernel"]
  np.testing.assert_array_equal(adapter["b_p"], 0.0)
  np.testing.assert_array_equal(adapter["b_s"], 0.0)
  # torch xavier_uniform_ on the reference's down_proj weights (r, d_in) and (r, d_out)
  torch.manual_seed(0)
  for name, fan in (("a_p", 512), ("a_s", 256)):
    ref = torch.nn.init.xavier_uniform_(torch.empty(64, fan)).numpy()
    bound = np.sqrt(6.0 / (fan + 64))
    ours = np.asarray(adapter[name])
    assert ours.shape == (fan, 64)
    assert np.abs(ours).max() <= bound and np.abs(ref).max() <= bound
    np.testing.assert_allclose(ours.std(), ref.std(), rtol=0.03)
    np.testing.assert_allclose(ours.std(), bound / np.sqrt(3), rtol=0.03)
  small = _base()
  adapter = reparam.init(jax.random.key(4), CFG, small)
  for name in ("c_p", "d_p", "c_s", "d_s"):  # the reference zero-initialises the branch biases
    np.testing.assert_array_equal(adapter["layer"]["kernel"][name], 0.0)
  jax.tree.map(np.testing.assert_array_equal, reparam.apply(small, adapter, CFG), small)


@WITH_BIAS
def test_apply_is_closed_form(bias):
  base = _base(bias)
  adapter = _trained_like(base)
  w, lv = np.asarray(base["layer"]["kernel"], np.float64), _np(adapter)
  applied = reparam.apply(base, adapter, CFG)["layer"]
  expect = w + S * (lv["a_p"] @ lv["b_p"] + w @ lv["a_s"] @ lv["b_s"])
  np.testing.assert_allclose(applied["kernel"], expect, rtol=1e-5, atol=1e-5)
  if bias:
    b = np.asarray(base["layer"]["bias"], np.float64)
    expect = b + S * (
        b @ lv["a_s"] @ lv["b_s"] + lv["c_p"] @ lv["b_p"] + lv["d_p"] + lv["c_s"] @ lv["b_s"] + lv["d_s"]
    )
    np.testing.assert_allclose(applied["bias"], expect, rtol=1e-5, atol=1e-5)


@WITH_BIAS
def test_matches_reference_forward(bias):
  """The authors' forward with biased branches reading the biased base output (or all bias-free)."""
  base = _base(bias)
  adapter = _trained_like(base)
  b = np.asarray(base["layer"]["bias"]) if bias else None
  reference = _Reference(np.asarray(base["layer"]["kernel"]), b, _np(adapter))
  x = np.random.default_rng(0).normal(size=(4, D_IN)).astype(np.float32)
  with torch.no_grad():
    expect = reference(torch.from_numpy(x)).numpy()
  dense = nn.Dense(D_OUT, use_bias=bias)
  for params in (reparam.apply(base, adapter, CFG), reparam.merge(base, adapter, CFG)):
    np.testing.assert_allclose(dense.apply({"params": params["layer"]}, x), expect, rtol=1e-5, atol=1e-5)
  assert not np.allclose(dense.apply({"params": base["layer"]}, x), expect, atol=1e-3)


@WITH_BIAS
def test_merge_equals_branch_mode_and_unmerge_restores(bias):
  base = _base(bias)
  adapter = _trained_like(base)

  mc.check_factored_equals_merged(base, adapter, CFG)
  mc.check_merge_unmerge(base, adapter, CFG)


@WITH_BIAS
def test_param_count_equals_formula_training_and_checkpoint(bias, tmp_path):
  base = _base(bias)
  adapter = reparam.init(jax.random.key(2), CFG, base)
  assert mc.trainable_count(adapter, CFG) == (
      R * (D_IN + D_OUT) + 2 * R * D_OUT + (2 * R + 2 * D_OUT if bias else 0)
  )
  if bias:
    mc.check_training_reduces_loss(CFG, base, lr=0.05, max_ratio=0.5)
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, CFG)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="fan_in_axes=0"):
    reparam.init(jax.random.key(0), AdapterConfig(targets="layer/bias", method="hydra"), _base())
  with pytest.raises(ValueError, match="only init='default'"):
    reparam.init(
        jax.random.key(0), AdapterConfig(targets="layer/kernel", method="hydra", init="gaussian"), _base()
    )
  with pytest.raises(ValueError, match="does not fit kernel"):
    reparam.init(jax.random.key(0), CFG, {"layer": {"kernel": jnp.ones((D_IN, D_OUT)), "bias": jnp.ones(3)}})
