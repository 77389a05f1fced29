"""Gemma 3 loaders: a Hugging Face folder gives transformers' logits; bad checkpoints are listed."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.models import gemma3, gemma3_loader


def test_hf_folder_gives_transformers_logits(tiny_gemma3_hf, tmp_path):
  hf_model, _ = tiny_gemma3_hf
  hf_model.save_pretrained(tmp_path)
  config, params = gemma3_loader.load_hf(tmp_path, scan_layers=True)
  assert gemma3_loader.read_config(tmp_path) == config
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 9))
  logits = gemma3.Gemma3(config, scan_layers=True).apply({"params": params}, jnp.asarray(ids))
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tiny_gemma3_hf):
  hf_model, tensors = tiny_gemma3_hf
  config = gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
  broken = dict(tensors)
  del broken["model.layers.0.mlp.up_proj.weight"]
  broken["model.layers.0.extra.weight"] = np.zeros(3)
  broken["model.norm.weight"] = np.zeros(7)
  with pytest.raises(ValueError) as e:
    gemma3_loader.params_from_hf(broken, config)
  message = str(e.value)
  assert "missing tensors: model.layers.0.mlp.up_proj.weight" in message
  assert "unexpected tensors: model.layers.0.extra.weight" in message
  assert "model.norm.weight: (7,)" in message


def test_folder_without_weights_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="must hold config.json and"):
    gemma3_loader.load_hf(tmp_path)


def test_registry_builds_the_checkpoint_architecture(tiny_gemma3_hf, tmp_path):
  import ml_collections

  from jaxpeft.models import registry

  hf_model, _ = tiny_gemma3_hf
  hf_model.save_pretrained(tmp_path)
  model = registry.build_model(
      ml_collections.ConfigDict({"name": "gemma3", "checkpoint": str(tmp_path), "scan_layers": True})
  )
  assert model.scan_layers and model.config == gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
