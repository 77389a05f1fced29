"""Gradient checkpointing of `jaxpeft.models.gemma3.Gemma3(remat=True)`: same loss and gradients, checkpointed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.models import gemma3

TINY = gemma3.Gemma3Config(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=3,
    max_position_embeddings=32,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
)


def _loss(model, params, ids):
  logits = model.apply({"params": params}, ids)
  targets = jax.nn.one_hot(ids[:, 1:], TINY.vocab_size)
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits[:, :-1]) * targets, -1))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_gives_the_same_loss_and_gradients(scan_layers):
  ids = jax.random.randint(jax.random.key(1), (2, 7), 0, TINY.vocab_size)
  plain = gemma3.Gemma3(TINY, scan_layers=scan_layers)
  checkpointed = gemma3.Gemma3(TINY, scan_layers=scan_layers, remat=True)
  params = plain.init(jax.random.key(0), ids)["params"]
  # Non-zero norm scales, so every parameter gets a gradient that depends on the others.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  loss, grads = jax.value_and_grad(lambda p: _loss(plain, p, ids))(params)
  remat_fn = jax.value_and_grad(lambda p: _loss(checkpointed, p, ids))
  remat_loss, remat_grads = remat_fn(params)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_grads, grads)
  # The checkpointed model really is checkpointed: its gradient's program holds the remat primitive.
  assert "remat" in str(jax.make_jaxpr(remat_fn)(params))
  assert "remat" not in str(jax.make_jaxpr(jax.grad(lambda p: _loss(plain, p, ids)))(params))
