"""Checks shared by the VeRA / NOLA / RandLoRA / LoHa / LoKr / (IA)^3 / BitFit tests.

Every check compares against an independent computation (PEFT in PyTorch, or the base weights themselves),
never against another output of the same jaxpeft code path.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import traverse_util

from jaxpeft.adapters import reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.adapters.core import get_method
from jaxpeft.adapters.partition import adapter_value_and_grad, optimizer_labels, param_count

TOL = dict(atol=1e-5, rtol=1e-5)


class Wrap(torch.nn.Module):
    """A one-layer torch model whose adapted module is called ``layer`` (PEFT ``target_modules=["layer"]``)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def t2n(x) -> np.ndarray:
    return np.asarray(x.detach().float().numpy(), np.float32)


def dense_params(d_in, d_out, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"layer": {"kernel": jax.random.normal(k1, (d_in, d_out), jnp.float32) / np.sqrt(d_in),
                      "bias": 0.1 * jax.random.normal(k2, (d_out,), jnp.float32)}}


def trainable_count(adapter, config) -> int:
    """Scalars in the adapter leaves the optimizer trains (the method's ``frozen_leaves`` excluded)."""
    frozen = get_method(config.method).frozen_leaves
    flat = traverse_util.flatten_dict(adapter)
    return sum(int(v.size) for k, v in flat.items() if k[-1] not in frozen)


def check_merge_unmerge(base, adapter, config, *, unmergeable=True):
    """merge == apply; unmerge(merge) == base; the adapter changes the weights."""
    applied = reparam.apply(base, adapter, config)
    merged = reparam.merge(base, adapter, config)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), applied, merged)
    changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b, atol=1e-4), merged, base)
    assert any(jax.tree_util.tree_leaves(changed)), "the adapter did not change any weight"
    if unmergeable:
        restored = reparam.unmerge(merged, adapter, config)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), restored, base)


def check_training_reduces_loss(config, base, steps=40, lr=3e-2, max_ratio=0.8):
    """Adam on the adapter only (frozen leaves get ``set_to_zero``) lowers a regression loss on ``layer``."""
    d_in, d_out = base["layer"]["kernel"].shape
    x = jax.random.normal(jax.random.key(10), (32, d_in))
    y = jnp.sin(x @ jax.random.normal(jax.random.key(11), (d_in, d_out))) + 0.5

    def loss_fn(params, x, y):
        return jnp.mean((x @ params["layer"]["kernel"] + params["layer"]["bias"] - y) ** 2)

    adapter = reparam.init(jax.random.key(12), config, base)
    tx = optax.multi_transform({"trainable": optax.adam(lr), "frozen": optax.set_to_zero()},
                               optimizer_labels(adapter, config))
    grad_fn = jax.jit(adapter_value_and_grad(loss_fn, config))
    state = tx.init(adapter)
    first = None
    for _ in range(steps):
        loss, grads = grad_fn(adapter, base, x, y)
        first = loss if first is None else first
        updates, state = tx.update(grads, state, adapter)
        adapter = optax.apply_updates(adapter, updates)
    last = loss_fn(reparam.apply(base, adapter, config), x, y)
    assert last < max_ratio * first, (float(first), float(last))
    # no optimizer state for frozen leaves: adam keeps 2 moments per trainable scalar (+ its step count)
    assert param_count(state) == 2 * trainable_count(adapter, config) + 1


def check_checkpoint_round_trip(tmp_path, base, adapter, config):
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, adapter, config)
    loaded, loaded_config = load_adapter(path, base)
    assert loaded_config == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, adapter)
    np.testing.assert_array_equal(reparam.apply(base, loaded, loaded_config)["layer"]["kernel"],
                                  reparam.apply(base, adapter, config)["layer"]["kernel"])


def linear_params(layer) -> dict:
    """Flax Dense params from a (PEFT-wrapped) torch Linear's base layer."""
    base = layer.get_base_layer()
    params = {"kernel": jnp.asarray(t2n(base.weight).T)}
    if base.bias is not None:
        params["bias"] = jnp.asarray(t2n(base.bias))
    return params


def conv_params(layer) -> dict:
    base = layer.get_base_layer()
    params = {"kernel": jnp.asarray(t2n(base.weight).transpose(2, 3, 1, 0))}
    if base.bias is not None:
        params["bias"] = jnp.asarray(t2n(base.bias))
    return params


def check_linear_parity(model, params, adapter, config, d_in, *, seed=0):
    """PEFT model (wrapping a Linear as ``layer``) vs ``nn.Dense`` on ``reparam.apply``, before/after merge."""
    x = np.random.default_rng(seed).normal(size=(4, d_in)).astype(np.float32)
    d_out = params["kernel"].shape[1]
    dense = nn.Dense(d_out, use_bias="bias" in params)
    expect = t2n(model(torch.from_numpy(x)))
    np.testing.assert_allclose(dense.apply({"params": reparam.apply(params, adapter, config)}, x), expect, **TOL)
    assert not np.allclose(expect, dense.apply({"params": params}, x), atol=1e-3)  # the adapter matters
    merged_torch = model.merge_and_unload().layer
    merged = reparam.merge(params, adapter, config)
    np.testing.assert_allclose(merged["kernel"], t2n(merged_torch.weight).T, **TOL)
    np.testing.assert_allclose(dense.apply({"params": merged}, x), t2n(merged_torch(torch.from_numpy(x))), **TOL)
    return float(np.abs(dense.apply({"params": reparam.apply(params, adapter, config)}, x) - expect).max())


def check_conv_parity(model, params, adapter, config, c_in, *, seed=1):
    """PEFT model (wrapping a 3x3 Conv2d, padding 1) vs ``nn.Conv`` on ``reparam.apply``, before/after merge."""
    x = np.random.default_rng(seed).normal(size=(2, c_in, 5, 5)).astype(np.float32)  # NCHW
    kh, kw, _, c_out = params["kernel"].shape
    conv = nn.Conv(c_out, (kh, kw), padding=1, use_bias="bias" in params)
    expect = t2n(model(torch.from_numpy(x))).transpose(0, 2, 3, 1)
    ours = conv.apply({"params": reparam.apply(params, adapter, config)}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(ours, expect, **TOL)
    assert not np.allclose(expect, conv.apply({"params": params}, x.transpose(0, 2, 3, 1)), atol=1e-3)
    merged_torch = model.merge_and_unload().layer
    merged = reparam.merge(params, adapter, config)
    np.testing.assert_allclose(merged["kernel"], t2n(merged_torch.weight).transpose(2, 3, 1, 0), **TOL)
    if "bias" in params:
        np.testing.assert_allclose(merged["bias"], t2n(merged_torch.bias), **TOL)
    return float(np.abs(ours - expect).max())
