"""Builds a model from a config's `model` section by name."""

import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxpeft.models import cnn, gemma3, gemma3_loader, hf_loader, resnet, unet, vit
from jaxpeft.models.bert import BertConfig, BertEncoder


def bert_from_checkpoint(
    checkpoint: str = hf_loader.EMBEDDED_MODEL_NAMES[0],
    num_classes: int | None = None,
    normalize: bool = False,
) -> BertEncoder:
  """A `BertEncoder` with the architecture of a Hugging Face folder's `config.json`.

  Only the architecture is read here; the weights come from `config.init_from.params` (which
  takes the same folder or name, see `jaxpeft.train.pretrained`).

  Args:
    checkpoint: a local Hugging Face BERT folder, or 'all-MiniLM-L6-v2' for the embedded default.
    num_classes: add a classification head (`classifier/dense`) with this many classes.
    normalize: L2-normalise the pooled embedding before the head. False by default: a linear
      head on unit-norm embeddings needs large weights and learns slowly.
  """
  folder = hf_loader.resolve_model_dir(checkpoint)
  config_file = folder / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(
        f"config.model.checkpoint={checkpoint!r}: {folder} has no config.json. Pass a Hugging Face"
        f" BERT folder, or {hf_loader.EMBEDDED_MODEL_NAMES[0]!r}."
    )
  config = BertConfig.from_dict(json.loads(config_file.read_text()))
  return BertEncoder(config, num_classes=num_classes, normalize=normalize)


def gemma3_from_checkpoint(
    checkpoint: str, scan_layers: bool = False, dtype: str = "float32", remat: bool = False
) -> gemma3.Gemma3:
  """A `Gemma3` with the architecture of a GGUF file or a Hugging Face folder (weights not read)."""
  return gemma3.Gemma3(
      gemma3_loader.read_config(checkpoint), scan_layers=scan_layers, remat=remat, dtype=jnp.dtype(dtype)
  )


def gemma3_from_architecture(
    architecture: Any, scan_layers: bool = False, dtype: str = "float32", remat: bool = False
) -> gemma3.Gemma3:
  """A `Gemma3` of the `Gemma3Config` fields in `architecture` (a dict), e.g. a tiny random model for tests."""
  return gemma3.from_config_dict(architecture, scan_layers=scan_layers, remat=remat, dtype=jnp.dtype(dtype))


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn.CNN,
    "mlp": cnn.MLP,
    "bert": bert_from_checkpoint,
    "vit": vit.ViT,
    "unet": unet.UNet,
    "gemma3": gemma3_from_checkpoint,
    "gemma3_architecture": gemma3_from_architecture,
    "resnet": resnet.ResNet,
}


def register_model(name: str, constructor: Callable[..., nn.Module]) -> None:
  """Makes `constructor(**model_config_without_name)` available as `config.model.name=name`."""
  _MODELS[name] = constructor


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """Instantiates `config.model` ({'name': ..., **kwargs}).

  A config that offers several models keeps each one's options in a section named after it
  (`config.model.cnn.features`, `config.model.mlp.hidden`): the chosen model's section is merged
  into its keyword arguments and the other models' sections are left out.
  """
  kwargs = {k: v for k, v in dict(model_config).items() if k not in _MODELS}
  name = kwargs.pop("name")
  kwargs.update(dict(model_config.get(name) or {}))
  if name not in _MODELS:
    raise ValueError(
        f"Unknown model {name!r}. Available: {sorted(_MODELS)}. Set --config.model.name to one of"
        " them, or register a new one with jaxpeft.models.registry.register_model."
    )
  try:
    return _MODELS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"config.model has an option that model {name!r} does not take: {e}") from e
