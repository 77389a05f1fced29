"""Generation: cached decoding equals full-sequence logits; greedy equals transformers' greedy;
sampling draws from the filtered softmax (closed form)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.models import gemma3, gemma3_loader, generate


@pytest.fixture(scope="module")
def tiny(tiny_gemma3_hf):
  hf_model, tensors = tiny_gemma3_hf
  config = gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
  return hf_model, config, {"params": gemma3_loader.params_from_hf(tensors, config)}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_equals_full_sequence(tiny, scan_layers):
  _, config, variables = tiny
  if scan_layers:
    variables = {"params": gemma3.stack_layers(variables["params"], config.num_hidden_layers)}
  model = gemma3.Gemma3(config, scan_layers=scan_layers)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 14)))
  mask = jnp.ones_like(ids).at[1, :3].set(0)  # row 1 left-padded
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  full = model.apply(variables, ids, mask, positions)
  cache = gemma3.init_cache(config, 2, 14)
  apply = jax.jit(model.apply)
  logits, cache = apply(variables, ids[:, :4], mask[:, :4], positions[:, :4], cache=cache)
  steps = [logits]
  for t in range(4, 14):  # one token at a time, well past the sliding window of 5
    logits, cache = apply(variables, ids[:, t : t + 1], mask[:, t : t + 1], positions[:, t : t + 1], cache=cache)
    steps.append(logits)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1))[valid], np.asarray(full)[valid], atol=1e-5)


def test_greedy_equals_transformers(tiny):
  hf_model, config, variables = tiny
  ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 6))
  mask = np.ones_like(ids)
  mask[1, :2], ids[1, :2] = 0, 0  # left padding
  ours = generate.generate(
      gemma3.Gemma3(config),
      variables,
      jnp.asarray(ids),
      jnp.asarray(mask),
      max_new_tokens=12,
      init_cache=functools.partial(gemma3.init_cache, config),
      stop_tokens=(1,),
      pad_id=0,
  )
  with torch.no_grad():
    expected = hf_model.generate(
        torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=1,
        pad_token_id=0,
    )[:, ids.shape[1] :].numpy()
  ours = np.asarray(ours)[:, : expected.shape[1]]
  np.testing.assert_array_equal(ours, expected)


def _filtered_probs(logits, temperature, top_k, top_p):
  """numpy transcription of transformers' Temperature -> TopK -> TopP warpers."""
  z = logits / temperature
  if top_k:
    z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  order = np.argsort(z)  # ascending, as TopPLogitsWarper
  p = np.exp(z[order] - z.max())
  p /= p.sum()
  remove = np.cumsum(p) <= 1 - top_p
  remove[-1] = False
  z[order[remove]] = -np.inf
  e = np.exp(z - z.max())
  return e / e.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.6)])
def test_sampling_follows_filtered_softmax(temperature, top_k, top_p):
  logits = np.array([2.0, 1.5, 0.3, -0.2, 1.0, -1.0], np.float32)
  draws = jax.jit(
      jax.vmap(lambda key: generate.sample(jnp.asarray(logits)[None], key, temperature, top_k, top_p)[0])
  )(jax.random.split(jax.random.key(0), 20000))
  frequencies = np.bincount(np.asarray(draws), minlength=6) / 20000
  np.testing.assert_allclose(frequencies, _filtered_probs(logits, temperature, top_k, top_p), atol=0.015)


def test_stop_token_pads_the_rest(tiny):
  _, config, variables = tiny
  ids = jnp.asarray(np.random.default_rng(2).integers(3, config.vocab_size, (1, 5)))
  free = generate.generate(
      gemma3.Gemma3(config),
      variables,
      ids,
      max_new_tokens=6,
      init_cache=functools.partial(gemma3.init_cache, config),
      stop_tokens=(-1,),
      pad_id=0,
  )
  stop = int(free[0, 2])
  stopped = generate.generate(
      gemma3.Gemma3(config),
      variables,
      ids,
      max_new_tokens=6,
      init_cache=functools.partial(gemma3.init_cache, config),
      stop_tokens=(stop,),
      pad_id=0,
  )
  first = list(np.asarray(free[0])).index(stop)
  np.testing.assert_array_equal(stopped[0, : first + 1], free[0, : first + 1])
  assert (np.asarray(stopped[0, first + 1 :]) == 0).all()
