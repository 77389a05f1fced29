"""ALLoRA: unscaled LoRA update and the per-row adaptive learning rate, against numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.allora import scale_by_allora
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import method_checks as mc

CFG = AdapterConfig(targets="layer/kernel", method="allora", rank=3, alpha=64.0, init="random")


def _np_row_scale(p, eta):
    return 1.0 / np.sqrt((np.asarray(p, np.float64) ** 2).sum(-1, keepdims=True) + 1.0 / eta**2)


def test_update_has_no_scale_and_init_is_identity():
    base = mc.dense_params(6, 5)
    adapter = reparam.init(jax.random.key(1), CFG, base)
    a, b = (np.asarray(adapter["layer"]["kernel"][k], np.float64) for k in "ab")
    expect = np.asarray(base["layer"]["kernel"], np.float64) + a @ b  # alpha=64 must not enter
    np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], expect, rtol=1e-6, atol=1e-6)
    mc.check_merge_unmerge(base, adapter, CFG)
    default = reparam.init(jax.random.key(1), AdapterConfig(targets="layer/kernel", method="allora", rank=3), base)
    np.testing.assert_array_equal(reparam.apply(base, default, CFG)["layer"]["kernel"], base["layer"]["kernel"])
    assert mc.trainable_count(default, CFG) == 3 * (6 + 5)
    x = jnp.linspace(-1, 1, 18).reshape(3, 6)
    with factored.intercept(base["layer"], adapter["layer"], AdapterConfig(targets="kernel", method="allora", rank=3)):
        hooked = nn.Dense(5).apply({"params": base["layer"]}, x)
    np.testing.assert_allclose(hooked, x @ expect + np.asarray(base["layer"]["bias"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.5, 4.0])
def test_scale_matches_formula_after_sgd_and_adam(eta):
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
              "b": jnp.asarray(np.vstack([np.zeros((1, 5)), rng.normal(size=(2, 5))]), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    lr = 0.1
    sgd = optax.chain(optax.sgd(lr), scale_by_allora(eta))
    updates, _ = sgd.update(grads, sgd.init(params), params)
    for k in params:
        np.testing.assert_allclose(updates[k], -lr * np.asarray(grads[k]) * _np_row_scale(params[k], eta), rtol=1e-6)
    # the zero row of b gets exactly eta times the base step
    np.testing.assert_allclose(updates["b"][0], -lr * eta * np.asarray(grads["b"][0]), rtol=1e-6)
    adam = optax.chain(optax.adam(lr), scale_by_allora(eta))
    updates, _ = adam.update(grads, adam.init(params), params)
    for k in params:  # first Adam step is lr * sign(g) (up to eps)
        np.testing.assert_allclose(updates[k], -lr * np.sign(grads[k]) * _np_row_scale(params[k], eta), rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="eta must be > 0"):
        scale_by_allora(0.0)
    tx = scale_by_allora(1.0)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update({"a": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))
    base = mc.dense_params(4, 3)
    with pytest.raises(ValueError, match="removes LoRA's dropout"):
        reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", method="allora", dropout=0.1), base)


def test_training_reduces_loss_and_checkpoint(tmp_path):
    base = mc.dense_params(8, 4)
    cfg = AdapterConfig(targets="layer/kernel", method="allora", rank=2)
    adapter = reparam.init(jax.random.key(12), cfg, base)
    tx = optax.chain(optax.adam(2e-2), scale_by_allora(eta=4.0))
    adapter, losses = mc.train(adapter, base, cfg, tx, *mc.regression_data(8, 4))
    assert losses[-1] < 0.8 * losses[0], losses
    mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)
