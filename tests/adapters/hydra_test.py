"""Hydra tests: closed form in numpy, the authors' two-branch forward in torch, merge/unmerge, init, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import adapter_value_and_grad, param_count

D_IN, D_OUT, R, ALPHA = 7, 5, 3, 4.5
CFG = AdapterConfig(targets="layer/kernel", method="hydra", rank=R, alpha=ALPHA)
S = ALPHA / R


def _base():
    return {"layer": {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT), jnp.float32),
                      "bias": jnp.linspace(-1.0, 1.0, D_OUT)}}


def _trained_like(adapter, seed=5):
    """Non-zero up-projections, so every term of the update matters."""
    leaves = adapter["layer"]["kernel"]
    keys = jax.random.split(jax.random.key(seed), 2)
    leaves = {**leaves, "b_p": 0.3 * jax.random.normal(keys[0], (R, D_OUT)),
              "b_s": 0.3 * jax.random.normal(keys[1], (R, D_OUT))}
    return {"layer": {"kernel": leaves}}


@pytest.fixture(scope="module")
def setup():
    base = _base()
    return base, _trained_like(reparam.init(jax.random.key(1), CFG, base))


def _np(adapter):
    return {k: np.asarray(v, np.float64) for k, v in adapter["layer"]["kernel"].items()}


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
    adapted = reparam.apply(small, reparam.init(jax.random.key(4), CFG, small), CFG)
    np.testing.assert_array_equal(adapted["layer"]["kernel"], small["layer"]["kernel"])


def test_apply_is_closed_form(setup):
    base, adapter = setup
    w, lv = np.asarray(base["layer"]["kernel"], np.float64), _np(adapter)
    expect = w + S * (lv["a_p"] @ lv["b_p"] + w @ lv["a_s"] @ lv["b_s"])
    np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], expect, rtol=1e-5, atol=1e-5)


def test_matches_reference_two_branch_forward_without_biases(setup):
    """The authors' forward ``fc(x) + par(x) + seq(fc(x))`` with bias-free branches and a bias-free base layer."""
    base, adapter = setup
    lv = _np(adapter)
    x = np.random.default_rng(0).normal(size=(4, D_IN)).astype(np.float32)
    fc = torch.nn.Linear(D_IN, D_OUT, bias=False)
    par = [torch.nn.Linear(D_IN, R, bias=False), torch.nn.Linear(R, D_OUT, bias=False)]
    seq = [torch.nn.Linear(D_OUT, R, bias=False), torch.nn.Linear(R, D_OUT, bias=False)]
    with torch.no_grad():
        fc.weight.copy_(torch.tensor(np.asarray(base["layer"]["kernel"]).T))
        for layer, name in zip(par + seq, ("a_p", "b_p", "a_s", "b_s")):
            layer.weight.copy_(torch.from_numpy(lv[name].T.astype(np.float32)))
        xt = torch.from_numpy(x)
        h = fc(xt)
        expect = (h + S * par[1](par[0](xt)) + S * seq[1](seq[0](h))).numpy()
    params = reparam.apply(base, adapter, CFG)
    ours = nn.Dense(D_OUT, use_bias=False).apply({"params": {"kernel": params["layer"]["kernel"]}}, x)
    np.testing.assert_allclose(ours, expect, rtol=1e-5, atol=1e-5)


def test_merge_equals_branch_mode_and_unmerge_restores(setup):
    base, adapter = setup

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(D_OUT, name="layer")(x)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, D_IN)), jnp.float32)
    merged = reparam.merge(base, adapter, CFG)
    with factored.intercept(base, adapter, CFG):
        hooked = Model().apply({"params": base}, x)
    np.testing.assert_allclose(Model().apply({"params": merged}, x), hooked, rtol=1e-5, atol=1e-5)
    restored = reparam.unmerge(merged, adapter, CFG)
    np.testing.assert_allclose(restored["layer"]["kernel"], base["layer"]["kernel"], rtol=1e-5, atol=1e-5)


def test_param_count_equals_formula_and_loss_falls(tmp_path):
    base = _base()
    adapter = reparam.init(jax.random.key(2), CFG, base)
    assert param_count(adapter) == R * (D_IN + D_OUT) + 2 * R * D_OUT
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, D_IN)), jnp.float32)
    y = jnp.sin(x @ jnp.ones((D_IN, D_OUT)))
    model = nn.Dense(D_OUT)

    def loss_fn(params, x, y):
        return jnp.mean((model.apply({"params": params["layer"]}, x) - y) ** 2)

    grad_fn = adapter_value_and_grad(loss_fn, CFG)
    tx = optax.adam(0.05)

    @jax.jit
    def step(adapter, opt_state):
        loss, grads = grad_fn(adapter, base, x, y)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    opt_state = tx.init(adapter)
    first = None
    for _ in range(40):
        adapter, opt_state, loss = step(adapter, opt_state)
        first = loss if first is None else first
    assert loss < 0.5 * first
    path = tmp_path / "hydra.safetensors"
    save_adapter(path, adapter, CFG)
    loaded, config = load_adapter(path, base_params=base)
    assert config == CFG
    jax.tree.map(np.testing.assert_array_equal, loaded, adapter)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="fan_in_axes=0"):
        reparam.init(jax.random.key(0), AdapterConfig(targets="layer/bias", method="hydra"), _base())
    with pytest.raises(ValueError, match="only init='default'"):
        reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", method="hydra", init="gaussian"),
                     _base())
