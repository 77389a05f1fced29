"""benchmarks/attention.py: its chunked variant equals BERT's attention (values and gradients, padding mask)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention


@pytest.mark.parametrize("length, query_chunk", [(32, 8), (32, 32), (24, 16)])
def test_chunked_attention_matches_flax_values_and_gradients(length, query_chunk):
  q, k, v = (jax.random.normal(key, (4, length, 2, 8)) for key in jax.random.split(jax.random.key(0), 3))
  pad = np.ones((4, length), np.int32)
  pad[:2, length // 2 :] = 0
  mask = nn.make_attention_mask(jnp.ones_like(pad), jnp.asarray(pad))  # BERT's float32 padding mask
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)))
  grad = lambda fn: jax.value_and_grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
  chunked = lambda q, k, v, mask: attention.chunked_attention(q, k, v, mask, query_chunk=query_chunk)
  flax_attention = lambda q, k, v, mask: nn.dot_product_attention(q, k, v, mask=mask)  # what BERT calls
  for name, fn in [("chunked", chunked), ("jax_nn", attention.variants(query_chunk)["jax_nn"])]:
    for got, want in zip(jax.tree.leaves(grad(fn)), jax.tree.leaves(grad(flax_attention))):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
