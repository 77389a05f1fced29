"""Merged export: a LoRA on Gemma 3, merged and written by `save_hf`, loads in transformers'
`Gemma3ForCausalLM.from_pretrained` and gives our adapted model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxpeft.adapters import AdapterConfig, reparam
from jaxpeft.models import gemma3, gemma3_export, gemma3_loader


def test_merged_lora_loads_in_transformers_with_our_logits(tiny_gemma3_hf, tmp_path):
  hf_model, tensors = tiny_gemma3_hf
  config = gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
  base = gemma3_loader.params_from_hf(tensors, config)
  adapter_config = AdapterConfig(r".*(attn/(q|k|v|o)|mlp/(gate|up|down))_proj/kernel", rank=2, alpha=4.0)
  adapter = reparam.init(jax.random.key(0), adapter_config, base)
  adapter = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  folder = gemma3_export.save_hf(tmp_path / "merged", config, base, adapter=adapter, adapter_config=adapter_config)

  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))  # past the sliding window of 5
  ours = gemma3.Gemma3(config).apply({"params": reparam.apply(base, adapter, adapter_config)}, jnp.asarray(ids))
  loaded = transformers.Gemma3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = loaded(torch.tensor(ids)).logits.numpy()
    plain = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs - plain).max() > 1e-2  # the merged adapter matters
  assert gemma3_loader.load_hf(folder)[0] == config


def test_scanned_params_export_the_same_tensors(tiny_gemma3_hf):
  hf_model, tensors = tiny_gemma3_hf
  config = gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
  scanned = gemma3_loader.params_from_hf(tensors, config, scan_layers=True)
  exported = gemma3_export.hf_tensors(config, scanned)
  assert exported.keys() == tensors.keys() - {"lm_head.weight"}
  for name, value in exported.items():
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)


def test_adapter_without_its_config_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="pass both or neither"):
    gemma3_export.save_hf(tmp_path, gemma3.Gemma3Config(num_hidden_layers=1), {}, adapter={})
