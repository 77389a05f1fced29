"""Writes Gemma 3 parameters (an adapter merged in, or not) as a Hugging Face folder transformers loads.

`save_hf(folder, config, params)` writes `config.json` (a `Gemma3ForCausalLM` text config: the fields of
`Gemma3Config` under transformers' names, rope per layer type as `rope_parameters`) and `model.safetensors`
(float32 unless `dtype` says otherwise) with transformers' tensor names: the inverse of
`gemma3_loader.params_from_hf` (`gemma3.hf_name` of each path, kernels transposed to torch's (out, in)),
so `Gemma3ForCausalLM.from_pretrained(folder)` and `gemma3_loader.load_hf(folder)` both read it. With
`adapter=` and `adapter_config=` the adapter is merged first (`reparam.merge`: W' = method.apply(W, adapter)),
so every method that reparametrises the projections exports, not only those PEFT can load. Scanned params
(`layers/`) are unstacked. The output is tied to the embedding (no `lm_head.weight`), as Gemma 3's is.
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import numpy as np
import safetensors.numpy

from jaxpeft.adapters import AdapterConfig, reparam
from jaxpeft.models import gemma3


def hf_config_dict(config: gemma3.Gemma3Config) -> dict[str, Any]:
  """The transformers `Gemma3TextConfig` dict of `config` (what `Gemma3Config.from_hf_dict` reads back)."""
  global_rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.global_rope_scaling != 1.0:
    global_rope = {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.global_rope_scaling}
  return {
      "architectures": ["Gemma3ForCausalLM"],
      "model_type": "gemma3_text",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "rms_norm_eps": config.rms_norm_eps,
      "query_pre_attn_scalar": config.query_pre_attn_scalar,
      "sliding_window": config.sliding_window,
      "layer_types": list(config.layer_types),
      "rope_parameters": {
          "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base_freq},
          "full_attention": global_rope,
      },
      "max_position_embeddings": config.max_position_embeddings,
      "final_logit_softcapping": config.final_logit_softcapping,
      "hidden_activation": config.hidden_activation,
      "tie_word_embeddings": True,
  }


def hf_tensors(
    config: gemma3.Gemma3Config, params: Mapping[str, Any], dtype: Any = np.float32
) -> dict[str, np.ndarray]:
  """transformers name -> array (torch layout) of Gemma 3 params (scanned or not)."""
  params = dict(params)
  if "layers" in params:
    params = gemma3.unstack_layers(params, config.num_hidden_layers)
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  return {
      gemma3.hf_name(path): np.ascontiguousarray(np.asarray(value).T if path.endswith("/kernel") else value, dtype)
      for path, value in flat.items()
  }


def save_hf(
    folder: str | pathlib.Path,
    config: gemma3.Gemma3Config,
    params: Mapping[str, Any],
    *,
    adapter: Any = None,
    adapter_config: AdapterConfig | None = None,
    dtype: Any = np.float32,
) -> pathlib.Path:
  """Writes `config.json` and `model.safetensors` of `params` (with `adapter` merged in) into `folder`.

  Raises:
    ValueError: only one of `adapter` and `adapter_config` is given.
  """
  if (adapter is None) != (adapter_config is None):
    raise ValueError(
        "save_hf merges an adapter only with both adapter= and adapter_config=; pass both or neither."
    )
  if adapter is not None:
    params = reparam.merge(params, adapter, adapter_config)
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
  safetensors.numpy.save_file(
      hf_tensors(config, params, dtype), folder / "model.safetensors", metadata={"format": "pt"}
  )
  return folder
