"""Gemma 3 decoder: logits equal transformers' Gemma3ForCausalLM on the same weights."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import selection
from jaxpeft.models import gemma3, gemma3_loader

_LENGTH = 13  # beyond the tiny model's sliding window of 5


@pytest.fixture(scope="module")
def tiny(tiny_gemma3_hf):
  hf_model, tensors = tiny_gemma3_hf
  config = gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
  return hf_model, tensors, config


def _hf_logits(hf_model, ids, mask=None):
  with torch.no_grad():
    out = hf_model(torch.tensor(np.asarray(ids)), attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.numpy()


def test_config_reads_transformers_rope_and_layer_types(tiny):
  _, _, config = tiny
  assert config.is_local == (True, False, True, False)
  assert (config.rope_local_base_freq, config.rope_theta, config.global_rope_scaling) == (100.0, 1000.0, 4.0)
  assert config.final_logit_softcapping == 5.0


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(tiny, scan_layers):
  hf_model, tensors, config = tiny
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, _LENGTH))
  params = gemma3_loader.params_from_hf(tensors, config, scan_layers=scan_layers)
  model = gemma3.Gemma3(config, scan_layers=scan_layers)
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), _hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_padding_mask_matches_transformers(tiny):
  hf_model, tensors, config = tiny
  ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, _LENGTH))
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # left padding
  ids[1, :4] = 0
  params = gemma3_loader.params_from_hf(tensors, config)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  logits = gemma3.Gemma3(config).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)
  )
  with torch.no_grad():
    expected = hf_model(
        torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
    ).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits)[mask == 1], expected[mask == 1], atol=1e-4, rtol=0)


def test_scan_and_unrolled_params_convert(tiny):
  _, tensors, config = tiny
  unrolled = gemma3_loader.params_from_hf(tensors, config)
  restored = gemma3.unstack_layers(
      gemma3.stack_layers(unrolled, config.num_hidden_layers), config.num_hidden_layers
  )
  jax.tree.map(np.testing.assert_array_equal, restored, unrolled)


def test_adapter_regexes_reach_projections(tiny):
  _, tensors, config = tiny
  params = gemma3_loader.params_from_hf(tensors, config)
  paths = dict(selection.named_leaves(params))
  attn = [p for p in paths if re.fullmatch(r".*attn/(q|k|v|o)_proj/kernel", p)]
  mlp = [p for p in paths if re.fullmatch(r".*mlp/(gate|up|down)_proj/kernel", p)]
  assert (len(attn), len(mlp)) == (4 * config.num_hidden_layers, 3 * config.num_hidden_layers)
  assert {gemma3.hf_name(p) for p in paths} <= set(tensors)


def test_context_longer_than_model_is_an_error(tiny):
  _, _, config = tiny
  model = gemma3.Gemma3(config)
  with pytest.raises(ValueError, match="longer than the model's context of 64"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 65), jnp.int32))
  with pytest.raises(ValueError, match="longer than the model's context"):
    gemma3.init_cache(config, 1, 65)
