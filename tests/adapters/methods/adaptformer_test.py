"""AdaptFormer through module hooks, against the numpy forward pass of the tiny transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import module_hook_checks as mh

M, S = 4, 0.7
CFG = AdapterConfig(targets=r"block_\d+/mlp/fc1/kernel", method="adaptformer", rank=M, options={"scale": S})


def test_init_is_identity_and_distribution():
    model, x, params = mh.model_and_input()
    adapter = reparam.init(jax.random.key(1), CFG, params)
    np.testing.assert_array_equal(mh.hooked_apply(model, params, adapter, CFG, x), model.apply({"params": params}, x))
    big = reparam.init(jax.random.key(0), AdapterConfig(targets="fc1/kernel", method="adaptformer", rank=256),
                       {"fc1": {"kernel": jnp.zeros((1024, 8))}})["fc1"]["kernel"]
    bound = 1 / np.sqrt(1024)  # torch kaiming_uniform_(a=sqrt(5)) on down (fan_in = d)
    assert 0.99 * bound < np.abs(big["down"]).max() <= bound
    for name in ("up", "down_bias", "up_bias"):
        np.testing.assert_array_equal(big[name], 0.0)
    count = sum(v.size for v in jax.tree.leaves(adapter))
    assert count == mh.DEPTH * (2 * M * mh.D + M + mh.D)


def test_output_equals_numpy_forward():
    model, x, params = mh.model_and_input()
    adapter = mh.randomize(reparam.init(jax.random.key(1), CFG, params))
    lv = {i: mh.np_tree(adapter[f"block_{i}"]["mlp"]["fc1"]["kernel"]) for i in range(mh.DEPTH)}

    def parallel(i, h, y):  # h: the MLP's input, y: its output
        z = np.maximum(h @ lv[i]["down"] + lv[i]["down_bias"], 0.0) @ lv[i]["up"] + lv[i]["up_bias"]
        return y + S * z

    expect = mh.np_forward(params, x, mlp=parallel)
    assert not np.allclose(expect, mh.np_forward(params, x), atol=1e-2)
    np.testing.assert_allclose(mh.hooked_apply(model, params, adapter, CFG, x), expect, rtol=1e-5, atol=1e-5)


def test_training_and_checkpoint(tmp_path):
    model, x, params = mh.model_and_input()
    mh.check_training_reduces_loss(model, x, params, CFG)
    mh.check_checkpoint_round_trip(tmp_path, model, x, params,
                                   mh.randomize(reparam.init(jax.random.key(1), CFG, params)), CFG)


def test_errors():
    model, x, params = mh.model_and_input()
    with pytest.raises(ValueError, match="2-D kernel of the MLP's first Dense"):
        reparam.init(jax.random.key(0), AdapterConfig(targets=r".*ln2/scale", method="adaptformer"), params)
    cfg = AdapterConfig(targets=r"block_0/(mlp/fc1|mlp/fc2)/kernel", method="adaptformer")
    with pytest.raises(ValueError, match="hook the same module 'block_0/mlp'"):
        mh.hooked_apply(model, params, reparam.init(jax.random.key(0), cfg, params), cfg, x)
    cfg = AdapterConfig(targets=r"block_0/mlp/fc2/kernel", method="adaptformer")  # d = HIDDEN != block width
    with pytest.raises(ValueError, match="AdaptFormer needs both to equal"):
        mh.hooked_apply(model, params, reparam.init(jax.random.key(0), cfg, params), cfg, x)
