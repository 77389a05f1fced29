"""TLoRA tests: ``W_0 T + s Delta`` against an entry-by-entry numpy evaluation of the tensor-ring formats (and
``np.kron`` for transform rank 1); the reference's identity / zero-core init and its init scales (PyTorch's
``kaiming_normal_`` for the "trm" / "lora" residuals); merge/unmerge, parameter count, checkpoint, training."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from jaxpeft.adapters.methods.tlora import balanced_modes
from tests.adapters.method_checks import (
    check_checkpoint_round_trip,
    check_merge_unmerge,
    check_training_reduces_loss,
    dense_params,
)

R, ALPHA, T_RANK = 2, 4.0, 3
IN_MODES, OUT_MODES = (2, 2, 2), (3, 2, 1)
D_IN, D_OUT = 8, 6


def _config(init="default", residual="tr", t_rank=T_RANK, **options):
  return AdapterConfig(
      targets="layer/kernel",
      method="tlora",
      rank=R,
      alpha=ALPHA,
      init=init,
      options={"transform_rank": t_rank, "residual": residual, **options},
  )


def _ring_entries(cores, row_modes, col_modes):
  """``M[(i..), (j..)] = tr(X_1[i_1, j_1] ... X_D[i_D, j_D])`` one entry at a time (cores ``(p, q, a, a)``)."""
  out = np.zeros((math.prod(row_modes), math.prod(col_modes)))
  for row, rows in enumerate(itertools.product(*map(range, row_modes))):
    for col, cols in enumerate(itertools.product(*map(range, col_modes))):
      prod = np.eye(cores[0].shape[-1])
      for core, i, j in zip(cores, rows, cols):
        prod = prod @ core[i, j]
      out[row, col] = np.trace(prod)
  return out


def _tr_entries(out_cores, in_cores, out_modes, in_modes):
  """``Delta[(o..), (i..)] = tr(B_1[o_1] ... B_E[o_E] C_1[i_1] ... C_D[i_D])`` one entry at a time."""
  out = np.zeros((math.prod(out_modes), math.prod(in_modes)))
  for row, os_ in enumerate(itertools.product(*map(range, out_modes))):
    for col, is_ in enumerate(itertools.product(*map(range, in_modes))):
      prod = np.eye(out_cores[0].shape[-1])
      for core, i in zip(out_cores + in_cores, os_ + is_):
        prod = prod @ core[i]
      out[row, col] = np.trace(prod)
  return out


def _np(leaves, name):
  return np.asarray(leaves[name], np.float64)


@pytest.mark.parametrize("residual", ["tr", "trm", "lora"])
def test_apply_is_w0_times_transform_plus_residual(residual):
  base = dense_params(D_IN, D_OUT)
  cfg = _config("random", residual, order=3, in_modes=list(IN_MODES), out_modes=list(OUT_MODES))
  leaves = reparam.init(jax.random.key(1), cfg, base)["layer"]["kernel"]
  t = _ring_entries([_np(leaves, f"transform_{d}") for d in range(3)], IN_MODES, IN_MODES)
  if residual == "tr":
    delta = _tr_entries(
        [_np(leaves, f"residual_out_{e}") for e in range(3)],
        [_np(leaves, f"residual_in_{d}") for d in range(3)],
        OUT_MODES,
        IN_MODES,
    )
  elif residual == "trm":
    delta = _ring_entries([_np(leaves, f"residual_{d}") for d in range(3)], OUT_MODES, IN_MODES)
  else:
    delta = _np(leaves, "lora_b") @ _np(leaves, "lora_a")
  w0 = np.asarray(base["layer"]["kernel"], np.float64).T  # PyTorch layout (d_out, d_in)
  expect = (w0 @ t + (ALPHA / R) * delta).T
  got = reparam.apply(base, {"layer": {"kernel": leaves}}, cfg)["layer"]["kernel"]
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
  assert np.abs(t - np.eye(D_IN)).max() > 0.05 and np.abs(delta).max() > 0.05  # both parts matter


def test_transform_rank_one_is_the_kronecker_product_of_the_cores():
  base = dense_params(D_IN, D_OUT)
  cfg = _config("random", t_rank=1, in_modes=list(IN_MODES), out_modes=list(OUT_MODES))
  leaves = reparam.init(jax.random.key(2), cfg, base)["layer"]["kernel"]
  g = [_np(leaves, f"transform_{d}")[:, :, 0, 0] for d in range(3)]
  delta = _tr_entries(
      [_np(leaves, f"residual_out_{e}") for e in range(3)],
      [_np(leaves, f"residual_in_{d}") for d in range(3)],
      OUT_MODES,
      IN_MODES,
  )
  w0 = np.asarray(base["layer"]["kernel"], np.float64).T
  expect = (w0 @ np.kron(np.kron(g[0], g[1]), g[2]) + (ALPHA / R) * delta).T
  got = reparam.apply(base, {"layer": {"kernel": leaves}}, cfg)["layer"]["kernel"]
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def _kaiming_normal_std(shape):
  """PyTorch's ``kaiming_normal_(a=sqrt(5))`` std for a tensor of ``shape`` (the reference's init)."""
  fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
  return torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)


@pytest.mark.parametrize("residual", ["tr", "trm", "lora"])
def test_default_init_is_identity_with_the_reference_scales(residual):
  d_in, d_out, r, t = 64, 48, 4, 2
  in_modes, out_modes = (4, 4, 4), (4, 4, 3)
  base = dense_params(d_in, d_out)
  cfg = AdapterConfig(
      targets="layer/kernel",
      method="tlora",
      rank=r,
      alpha=ALPHA,
      options={
          "transform_rank": t,
          "residual": residual,
          "in_modes": list(in_modes),
          "out_modes": list(out_modes),
      },
  )
  adapter = reparam.init(jax.random.key(3), cfg, base)
  np.testing.assert_array_equal(reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"])
  leaves = adapter["layer"]["kernel"]
  for d, n in enumerate(in_modes):  # Proposition 1: every (a, b) slice is I / t
    np.testing.assert_array_equal(
        leaves[f"transform_{d}"], np.broadcast_to(np.eye(n)[..., None, None] / t, (n, n, t, t))
    )
  if residual == "tr":
    np.testing.assert_array_equal(leaves["residual_out_0"], 0.0)
    np.testing.assert_allclose(np.std(leaves["residual_out_1"]), math.sqrt(4) / r**2, rtol=0.3)  # q = 4
    in_all = np.concatenate([np.ravel(leaves[f"residual_in_{d}"]) for d in range(3)])  # n = 4 cores
    np.testing.assert_allclose(in_all.std(), 1 / math.sqrt(4), rtol=0.2)
  elif residual == "trm":
    np.testing.assert_array_equal(leaves["residual_0"], 0.0)
    rest = np.concatenate([np.ravel(leaves[f"residual_{d}"]) for d in (1, 2)])  # (4, 4, r, r) both
    np.testing.assert_allclose(rest.std(), _kaiming_normal_std((4, 4, r, r)), rtol=0.2)
  else:
    np.testing.assert_array_equal(leaves["lora_b"], 0.0)
    np.testing.assert_allclose(np.std(leaves["lora_a"]), _kaiming_normal_std((r, d_in)), rtol=0.2)


@pytest.mark.parametrize(
    "shape,order,residual",
    [((D_IN, D_OUT), 3, "tr"), ((3, 3, 4, 6), 2, "tr"), ((D_IN, D_OUT), 3, "trm"), ((D_IN, D_OUT), 2, "lora")],
)
def test_merge_unmerge_and_count(shape, order, residual):
  base = {"layer": {"kernel": jax.random.normal(jax.random.key(3), shape) / 4, "bias": jnp.zeros(shape[-1])}}
  fan_in = {"layer/kernel": len(shape) - 1}
  cfg = AdapterConfig(
      targets="layer/kernel",
      method="tlora",
      rank=R,
      alpha=ALPHA,
      init="random",
      fan_in_axes=fan_in,
      options={"order": order, "transform_rank": T_RANK, "residual": residual},
  )
  adapter = reparam.init(jax.random.key(4), cfg, base)
  check_merge_unmerge(base, adapter, cfg)
  d_in, d_out = math.prod(shape[:-1]), shape[-1]
  n, q = balanced_modes(d_in, order), balanced_modes(d_out, order)
  expect = (
      T_RANK**2 * sum(m * m for m in n)
      + {
          "tr": R * R * (sum(n) + sum(q)),
          "trm": R * R * sum(a * b for a, b in zip(n, q)),
          "lora": R * (d_in + d_out),
      }[residual]
  )
  assert param_count(adapter) == expect


@pytest.mark.parametrize("n,order", [(768, 3), (97, 2), (64, 4), (6, 3)])
def test_balanced_modes(n, order):
  modes = balanced_modes(n, order)
  assert len(modes) == order and math.prod(modes) == n and list(modes) == sorted(modes, reverse=True)
  if n == 64:
    assert modes == (4, 4, 2, 2)  # 2^6 into 4 buckets: no split of 64 into 4 factors is more balanced


def test_checkpoint_round_trip_with_explicit_modes(tmp_path):
  base = dense_params(D_IN, D_OUT)
  cfg = _config("random", in_modes=list(IN_MODES), out_modes=list(OUT_MODES))
  adapter = reparam.init(jax.random.key(5), cfg, base)
  check_checkpoint_round_trip(tmp_path, base, adapter, cfg)


def test_training_reduces_loss():
  check_training_reduces_loss(_config(), dense_params(D_IN, D_OUT), lr=1e-2)


def test_bad_inputs_are_refused():
  base = dense_params(D_IN, D_OUT)
  with pytest.raises(ValueError, match="modes must multiply"):
    reparam.init(jax.random.key(0), _config(in_modes=[3, 3, 1]), base)
  with pytest.raises(ValueError, match="equal lengths"):
    reparam.init(jax.random.key(0), _config(residual="trm", in_modes=[2, 4], out_modes=[3, 2, 1]), base)
  reparam.init(jax.random.key(0), _config(in_modes=[2, 4], out_modes=[3, 2, 1]), base)  # fine for "tr"
  with pytest.raises(ValueError, match="positive ints"):
    reparam.init(jax.random.key(0), _config(order=0), base)
  with pytest.raises(ValueError, match="unknown TLoRA residual"):
    reparam.init(jax.random.key(0), _config(residual="tt"), base)
