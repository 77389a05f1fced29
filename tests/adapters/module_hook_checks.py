"""Module-hook test scaffold: a tiny pre-LN transformer (``TinyViT``) and its plain-numpy twin (``np_forward``,
with hook points for every module-adding adapter), shared by the Houlsby, AdaptFormer, prompt-tuning and VPT
tests, plus the training and checkpoint checks run through ``module_hooks.intercept``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.adapters import module_hooks, reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter

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


def np_tree(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_ln(p, x):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]


def np_dense(p, x):
  return x @ p["kernel"] + p["bias"]


def np_forward(
    params,
    x,
    *,
    embed_out=lambda e: e,
    block_in=lambda i, x: x,
    out_proj=lambda i, y: y,
    mlp=lambda i, h, y: y,
    fc2=lambda i, y: y,
):
  """The numpy forward pass; the keyword callables are the hook points (identity by default)."""
  p = np_tree(params)
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
  with module_hooks.intercept(params, adapter, config):
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
  np.testing.assert_array_equal(
      hooked_apply(model, params, loaded, loaded_config, x), hooked_apply(model, params, adapter, config, x)
  )


def prompt_at(adapter, path):
  """The ``prompt`` leaf (float64 numpy) of the prompt-tuning / VPT adapter targeting ``path``."""
  leaf = adapter
  for key in path.split("/"):
    leaf = leaf[key]
  return np.asarray(leaf["prompt"], np.float64)
