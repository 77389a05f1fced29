"""Tiny Flax models shared by the adapter tests (every layout the adapters fold: Dense, DenseGeneral, Embed,
Conv, scanned layers)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

VOCAB, WIDTH, HEADS, HEAD_DIM = 11, 8, 2, 4

# fan_in_axes for the 3-D DenseGeneral kernels of TinyTransformer.
ATTENTION_FAN_IN = {r".*query/kernel": 1, r".*out/kernel": 2}


class TinyTransformer(nn.Module):
  """Embed -> Dense -> DenseGeneral q (WIDTH -> HEADS x HEAD_DIM) -> DenseGeneral out (back to WIDTH)."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, WIDTH, param_dtype=self.dtype, name="embed")(tokens)
    x = nn.Dense(WIDTH, param_dtype=self.dtype, name="dense")(x)
    q = nn.DenseGeneral((HEADS, HEAD_DIM), param_dtype=self.dtype, name="query")(x)
    return nn.DenseGeneral(WIDTH, axis=(-2, -1), param_dtype=self.dtype, name="out")(jnp.tanh(q))


class TinyConv(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3), padding=1, name="conv")(x)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(WIDTH, name="dense")(x)), None


class ScannedMLP(nn.Module):
  """Three Dense layers under nn.scan: kernels have a leading layer axis, (3, WIDTH, WIDTH)."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


def tokens(n=6):
  return (jnp.arange(2 * n).reshape(2, n) * 7) % VOCAB


def init_params(model, x, seed=0):
  return model.init(jax.random.key(seed), x)["params"]
