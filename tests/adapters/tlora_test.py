"""TLoRA tests: transform and residual against an entry-by-entry numpy evaluation of the TT / TR formats;
identity init, merge/unmerge, parameter count, checkpoint (with explicit modes), training."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from jaxpeft.adapters.tlora import balanced_modes
from tests.adapters.method_checks import (check_checkpoint_round_trip, check_merge_unmerge,
                                          check_training_reduces_loss, dense_params)

R, ALPHA, T_RANK = 2, 4.0, 3
IN_MODES, OUT_MODES = (2, 2, 2), (3, 2, 1)
D_IN, D_OUT = 8, 6


def _config(init="default", **options):
    return AdapterConfig(targets="layer/kernel", method="tlora", rank=R, alpha=ALPHA, init=init,
                         options={"transform_rank": T_RANK, **options})


def _entries(cores, row_modes, col_modes, ring):
    """Matrix of a TT (``ring=False``) or TR (``ring=True``) matrix format, one entry at a time."""
    out = np.zeros((math.prod(row_modes), math.prod(col_modes)))
    for row, rows in enumerate(itertools.product(*map(range, row_modes))):
        for col, cols in enumerate(itertools.product(*map(range, col_modes))):
            prod = np.eye(cores[0].shape[0])
            for core, i, j in zip(cores, rows, cols):
                prod = prod @ core[:, i, j, :]
            out[row, col] = np.trace(prod) if ring else prod[0, 0]
    return out


def test_apply_is_transform_times_kernel_plus_tensor_ring_residual():
    base = dense_params(D_IN, D_OUT)
    cfg = _config("random", order=3, in_modes=list(IN_MODES), out_modes=list(OUT_MODES))
    leaves = reparam.init(jax.random.key(1), cfg, base)["layer"]["kernel"]
    g = [np.asarray(leaves[f"transform_{d}"], np.float64) for d in range(3)]
    h = [np.asarray(leaves[f"residual_{d}"], np.float64) for d in range(3)]
    assert [c.shape for c in g] == [(1, 2, 2, T_RANK), (T_RANK, 2, 2, T_RANK), (T_RANK, 2, 2, 1)]
    t_f = np.eye(D_IN) + _entries(g, IN_MODES, IN_MODES, ring=False)
    res = (ALPHA / R) * _entries(h, IN_MODES, OUT_MODES, ring=True)
    expect = t_f @ np.asarray(base["layer"]["kernel"], np.float64) + res
    got = reparam.apply(base, {"layer": {"kernel": leaves}}, cfg)["layer"]["kernel"]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    assert np.abs(t_f - np.eye(D_IN)).max() > 0.1 and np.abs(res).max() > 0.1  # both parts matter


def test_default_init_is_identity():
    base = dense_params(D_IN, D_OUT)
    cfg = _config()
    adapter = reparam.init(jax.random.key(2), cfg, base)
    np.testing.assert_allclose(reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(adapter["layer"]["kernel"]["transform_2"], 0.0)
    np.testing.assert_array_equal(adapter["layer"]["kernel"]["residual_2"], 0.0)
    first = np.asarray(adapter["layer"]["kernel"]["residual_0"])  # N(0, 1/r)
    np.testing.assert_allclose(first.std(), 1 / np.sqrt(R), rtol=0.5)


@pytest.mark.parametrize("shape,order", [((D_IN, D_OUT), 3), ((3, 3, 4, 6), 2)])
def test_merge_unmerge_and_count(shape, order):
    base = {"layer": {"kernel": jax.random.normal(jax.random.key(3), shape) / 4, "bias": jnp.zeros(shape[-1])}}
    fan_in = {"layer/kernel": len(shape) - 1}
    cfg = AdapterConfig(targets="layer/kernel", method="tlora", rank=R, alpha=ALPHA, init="random",
                        fan_in_axes=fan_in, options={"order": order, "transform_rank": T_RANK})
    adapter = reparam.init(jax.random.key(4), cfg, base)
    scale = jax.tree_util.tree_map(lambda x: 0.3 * x, adapter)  # keep T_f well conditioned for the solve
    check_merge_unmerge(base, scale, cfg)
    d_in, d_out = math.prod(shape[:-1]), shape[-1]
    n, q = balanced_modes(d_in, order), balanced_modes(d_out, order)
    ranks = [1] + [T_RANK] * (order - 1) + [1]
    expect = sum(ranks[d] * n[d] ** 2 * ranks[d + 1] for d in range(order)) + sum(
        R * R * n[d] * q[d] for d in range(order))
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


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="modes must multiply"):
        reparam.init(jax.random.key(0), _config(in_modes=[3, 3, 1]), dense_params(D_IN, D_OUT))
    with pytest.raises(ValueError, match="positive ints"):
        reparam.init(jax.random.key(0), _config(order=0), dense_params(D_IN, D_OUT))
