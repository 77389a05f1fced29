"""Houlsby adapters through module hooks, against a plain-numpy forward pass of a tiny transformer.

The tiny pre-LN transformer (``TinyViT``) and its numpy twin (``np_forward``, with hook points for every
module-adding adapter) are shared with the AdaptFormer and prompt-tuning tests.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft.adapters import houlsby, reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.adapters.config import AdapterConfig

D, HIDDEN, DEPTH, CLASSES, VOCAB = 8, 16, 2, 3, 13


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(HIDDEN, name="fc1")(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(D, name=n)(h) for n in ("q", "k", "v"))
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(D), axis=-1) @ v
        x = x + nn.Dense(D, name="out")(att)
        return x + Mlp(name="mlp")(nn.LayerNorm(name="ln2")(x))


class TinyViT(nn.Module):
    """[CLS, tokens] -> DEPTH pre-LN blocks -> head on CLS. ``tokens`` are ints (text, via Embed) or patches."""

    text: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens) if self.text else tokens
        cls = self.param("cls", nn.initializers.normal(1.0), (1, D))
        x = jnp.concatenate([jnp.broadcast_to(cls, x.shape[:-2] + (1, D)), x], axis=-2)
        for i in range(DEPTH):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(CLASSES, name="head")(x[..., 0, :])


def model_and_input(text=False):
    model = TinyViT(text=text)
    x = (jnp.arange(10).reshape(2, 5) * 3 % VOCAB) if text else jax.random.normal(jax.random.key(7), (2, 5, D))
    params = model.init(jax.random.key(0), x)["params"]
    return model, x, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)


# ---- numpy twin -------------------------------------------------------------------------------------------

def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_ln(p, x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]


def np_dense(p, x):
    return x @ p["kernel"] + p["bias"]


def np_forward(params, x, *, embed_out=lambda e: e, block_in=lambda i, x: x, out_proj=lambda i, y: y,
               mlp=lambda i, h, y: y, fc2=lambda i, y: y):
    """The numpy forward pass; the keyword callables are the hook points (identity by default)."""
    p = _np(params)
    x = embed_out(p["embed"]["embedding"][np.asarray(x)]) if "embed" in p else np.asarray(x, np.float64)
    x = np.concatenate([np.broadcast_to(p["cls"], x.shape[:-2] + (1, D)), x], axis=-2)
    for i in range(DEPTH):
        b = p[f"block_{i}"]
        x = block_in(i, x)
        h = np_ln(b["ln1"], x)
        q, k, v = (np_dense(b[n], h) for n in ("q", "k", "v"))
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(D)
        att = np.exp(s - s.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True) @ v
        x = x + out_proj(i, np_dense(b["out"], att))
        h = np_ln(b["ln2"], x)
        y = fc2(i, np_dense(b["mlp"]["fc2"], np_gelu(np_dense(b["mlp"]["fc1"], h))))
        x = x + mlp(i, h, y)
    return np_dense(p["head"], x[..., 0, :])


def hooked_apply(model, params, adapter, config, x):
    with houlsby.intercept(params, adapter, config):
        return model.apply({"params": params}, x)


def randomize(adapter, scale=0.3, seed=2):
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [v + scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


def check_training_reduces_loss(model, x, params, config, steps=30, lr=3e-2):
    """Adam on the adapter only, cross-entropy on fixed labels; returns (first, last) loss."""
    labels = jnp.arange(x.shape[0]) % CLASSES
    adapter = reparam.init(jax.random.key(3), config, params)

    @jax.jit
    def step(adapter, state):
        def loss_fn(ad):
            logits = hooked_apply(model, params, ad, config, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    tx = optax.adam(lr)
    state = tx.init(adapter)
    losses = []
    for _ in range(steps):
        adapter, state, loss = step(adapter, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    return losses[0], losses[-1]


def check_checkpoint_round_trip(tmp_path, model, x, params, adapter, config):
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, adapter, config)
    loaded, loaded_config = load_adapter(path, params)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, adapter)
    np.testing.assert_array_equal(hooked_apply(model, params, loaded, loaded_config, x),
                                  hooked_apply(model, params, adapter, config, x))


# ---- Houlsby ----------------------------------------------------------------------------------------------

M = 3
CFG = AdapterConfig(targets=r"block_\d+/(out|mlp/fc2)/kernel", method="houlsby", rank=M)


def _np_adapter(leaves):
    lv = _np(leaves)
    return lambda h: h + np_gelu(h @ lv["down"] + lv["down_bias"]) @ lv["up"] + lv["up_bias"]


def test_output_equals_numpy_forward():
    model, x, params = model_and_input()
    adapter = randomize(reparam.init(jax.random.key(1), CFG, params))
    out = {i: _np_adapter(adapter[f"block_{i}"]["out"]["kernel"]) for i in range(DEPTH)}
    fc2 = {i: _np_adapter(adapter[f"block_{i}"]["mlp"]["fc2"]["kernel"]) for i in range(DEPTH)}
    expect = np_forward(params, x, out_proj=lambda i, y: out[i](y), fc2=lambda i, y: fc2[i](y))
    base = np_forward(params, x)
    np.testing.assert_allclose(model.apply({"params": params}, x), base, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expect, base, atol=1e-2)
    np.testing.assert_allclose(jax.jit(hooked_apply, static_argnums=(0, 3))(model, params, adapter, CFG, x),
                               expect, rtol=1e-5, atol=1e-5)


def test_zero_up_is_the_base_model_and_init_is_near_identity():
    model, x, params = model_and_input()
    adapter = randomize(reparam.init(jax.random.key(1), CFG, params))
    zero_up = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if path[-1].key in ("up", "up_bias") else v, adapter)
    np.testing.assert_array_equal(hooked_apply(model, params, zero_up, CFG, x), model.apply({"params": params}, x))
    init = reparam.init(jax.random.key(1), CFG, params)
    np.testing.assert_allclose(hooked_apply(model, params, init, CFG, x), model.apply({"params": params}, x),
                               atol=1e-4)


def test_init_and_param_count():
    params = {"layer": {"kernel": jnp.zeros((4, 256))}}
    adapter = reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", method="houlsby", rank=128),
                           params)["layer"]["kernel"]
    for name in ("down", "up"):  # TF truncated_normal(stddev=1e-3): cut at 2 std, std 0.8796e-3
        w = np.asarray(adapter[name])
        assert np.abs(w).max() <= 2e-3 and np.abs(w).max() > 1.9e-3
        np.testing.assert_allclose(w.std(), 0.8796e-3, rtol=0.03)
    np.testing.assert_array_equal(adapter["down_bias"], 0.0)
    np.testing.assert_array_equal(adapter["up_bias"], 0.0)
    _, _, vit = model_and_input()
    count = sum(v.size for v in jax.tree.leaves(reparam.init(jax.random.key(0), CFG, vit)))
    assert count == 2 * DEPTH * (2 * M * D + M + D)


def test_training_and_checkpoint(tmp_path):
    model, x, params = model_and_input()
    check_training_reduces_loss(model, x, params, CFG)
    check_checkpoint_round_trip(tmp_path, model, x, params, randomize(reparam.init(jax.random.key(1), CFG, params)),
                                CFG)


def test_errors():
    model, x, params = model_and_input()
    adapter = reparam.init(jax.random.key(1), CFG, params)
    with pytest.raises(ValueError, match="adds modules to the forward pass"):
        reparam.apply(params, adapter, CFG)
    with pytest.raises(ValueError, match="were not called inside the intercept block"):
        with houlsby.intercept(params, adapter, CFG):
            pass
    with pytest.raises(ValueError, match="does not add modules"):
        with houlsby.intercept(params, adapter, AdapterConfig(targets=".*out/kernel")):
            pass
    with pytest.raises(ValueError, match="has no adapter dropout"):
        reparam.init(jax.random.key(1), AdapterConfig(targets=".*out/kernel", method="houlsby", dropout=0.1), params)
    with pytest.raises(ValueError, match="unknown activation"):
        reparam.init(jax.random.key(1), AdapterConfig(targets=".*out/kernel", method="houlsby",
                                                      options={"activation": "tanh"}), params)
