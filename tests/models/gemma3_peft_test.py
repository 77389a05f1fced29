"""PEFT interop on Gemma 3: a jaxpeft LoRA / DoRA exported with `export_peft` (module names from
`gemma3.hf_module_name`) loads with PEFT on transformers' Gemma3ForCausalLM and gives the same logits."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxpeft.adapters import AdapterConfig, reparam
from jaxpeft.adapters.peft_format import export_peft
from jaxpeft.models import gemma3, gemma3_loader

_TARGETS = r".*attn/(q|k|v|o)_proj/kernel|.*mlp/(gate|up|down)_proj/kernel"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_exported_adapter_gives_peft_logits(tiny_gemma3_hf, tmp_path, method):
  hf_model, tensors = tiny_gemma3_hf
  config = gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
  base = gemma3_loader.params_from_hf(tensors, config)
  adapter_config = AdapterConfig(_TARGETS, method=method, rank=2, alpha=4.0)
  adapter = reparam.init(jax.random.key(0), adapter_config, base)
  leaves, tree = jax.tree.flatten(adapter)  # LoRA's b starts at zero: make every factor non-zero
  keys = jax.random.split(jax.random.key(1), len(leaves))
  adapter = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  export_peft(tmp_path, adapter, adapter_config, base, module_name=gemma3.hf_module_name)

  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
  ours = gemma3.Gemma3(config).apply({"params": reparam.apply(base, adapter, adapter_config)}, jnp.asarray(ids))
  theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
  with torch.no_grad():
    expected = theirs(torch.tensor(ids)).logits.numpy()
    plain = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)
  assert np.abs(expected - plain).max() > 1e-2  # the adapter matters
