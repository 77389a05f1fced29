"""Batched sampling from a causal LM with a KV cache (greedy, temperature, top-k, top-p, stop tokens).

`generate` prefills the cache with the (left-padded) prompts in one call, then decodes one token
per step inside a jitted `lax.while_loop` that ends when every row has produced a stop token or
`max_new_tokens` are out. A row that stops keeps emitting `pad_id`, as transformers' `generate`
does after an EOS. RoPE positions count real tokens only (cumsum of the mask - 1, as transformers
computes `position_ids` from the attention mask).

Sampling (`sample`), per row, with logits z over the vocabulary:

  greedy (temperature == 0):  argmax z
  otherwise                   z' = z / temperature; keep the top_k largest (top_k > 0); keep the
                              smallest set of most likely tokens whose probability mass reaches
                              top_p (top_p < 1; the most likely token is always kept); draw from
                              softmax(z') over the kept tokens.

The order temperature -> top-k -> top-p is transformers' logits-processor order.

The model is any Flax module called as `model.apply(variables, ids, mask, positions, cache=cache)
-> (logits, cache)` with a cache from `init_cache(batch, max_len)`, as `jaxpeft.models.gemma3`.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def sample(
    logits: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """Token ids (batch,) drawn from logits (batch, vocab) as the module docstring says."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / temperature
  masked = jnp.finfo(jnp.float32).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, masked, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, masked, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def generate(
    model: Any,
    variables: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    init_cache: Callable[[int, int], Any],
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
) -> jax.Array:
  """New tokens (batch, max_new_tokens) continuing left-padded `prompt_ids` (batch, P).

  Args:
    model: the causal LM (see the module docstring).
    variables: its variables ({'params': ...}).
    prompt_ids: int ids, left-padded.
    prompt_mask: (batch, P), 1 for real tokens (default: all real).
    max_new_tokens: how many tokens to produce at most.
    init_cache: `(batch, max_len) -> empty cache`, e.g.
      `functools.partial(gemma3.init_cache, config)`.
    rng: PRNG key for sampling (unused when greedy).
    temperature, top_k, top_p: the sampling rule (temperature 0: greedy).
    stop_tokens: ids that end a row (the stop token is emitted, then `pad_id`).
    pad_id: what a stopped row emits.
  """
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1] and top_k={top_k} >= 0.")
  batch, length = prompt_ids.shape
  if prompt_mask is None:
    prompt_mask = jnp.ones((batch, length), jnp.int32)
  cache = init_cache(batch, length + max_new_tokens)
  rng = jax.random.key(0) if rng is None else rng
  stops = jnp.asarray(stop_tokens, jnp.int32).reshape(-1)
  return _generate(
      model,
      variables,
      prompt_ids,
      prompt_mask,
      cache,
      rng,
      stops,
      max_new_tokens,
      temperature,
      top_k,
      top_p,
      pad_id,
  )


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10, 11))
def _generate(
    model, variables, prompt_ids, prompt_mask, cache, rng, stops, max_new_tokens, temperature, top_k, top_p, pad_id
):
  batch = prompt_ids.shape[0]
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  logits, cache = model.apply(variables, prompt_ids, prompt_mask, positions, cache=cache)

  def step(state):
    i, cache, logits, position, done, out, rng = state
    rng, key = jax.random.split(rng)
    token = sample(logits, key, temperature, top_k, top_p).astype(jnp.int32)
    token = jnp.where(done, pad_id, token)
    out = out.at[:, i].set(token)
    done = done | jnp.isin(token, stops)
    logits, cache = model.apply(
        variables, token[:, None], jnp.ones((batch, 1), jnp.int32), position[:, None], cache=cache
    )
    return i + 1, cache, logits[:, -1], position + 1, done, out, rng

  def keep_going(state):
    i, done = state[0], state[4]
    return (i < max_new_tokens) & ~jnp.all(done)

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  state = (
      jnp.zeros((), jnp.int32),
      cache,
      logits[:, -1],
      positions[:, -1] + 1,
      jnp.zeros((batch,), bool),
      out,
      rng,
  )
  return jax.lax.while_loop(keep_going, step, state)[5]
