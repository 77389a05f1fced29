"""Builds a model from a config's `model` section by name."""

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from jaxpeft.models import cnn

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn.CNN,
    "mlp": cnn.MLP,
}


def register_model(name: str, constructor: Callable[..., nn.Module]) -> None:
  """Makes `constructor(**model_config_without_name)` available as `config.model.name=name`."""
  _MODELS[name] = constructor


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """Instantiates `config.model` ({'name': ..., **kwargs})."""
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  if name not in _MODELS:
    raise ValueError(
        f"Unknown model {name!r}. Available: {sorted(_MODELS)}. Set --config.model.name to one of"
        " them, or register a new one with jaxpeft.models.registry.register_model."
    )
  try:
    return _MODELS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"config.model has an option that model {name!r} does not take: {e}") from e
