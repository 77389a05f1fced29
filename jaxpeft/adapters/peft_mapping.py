"""How a method declares its Hugging Face PEFT counterpart (``AdapterMethod.peft``), and the layout helpers.

A method with a PEFT counterpart sets the class attribute ``peft = PeftMapping(...)`` in its own file: the
PEFT type, the layer kinds PEFT supports for it, its tensor rules (jaxpeft leaf -> PEFT tensor), its
config fields both ways, and the shapes of model-level shared buffers. ``jaxpeft.adapters.peft_format``
does the rest (module names, reading and writing folders, inverting the rules, diffs) for every method
alike. The layouts and transposition rules are described in ``peft_format``'s docstring.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import Target


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one target's layer looks in PyTorch: ``kind`` linear / conv / embedding, conv ``window``."""

  kind: str
  window: tuple[int, ...]
  c_in: int
  d_out: int

  @property
  def ones(self) -> tuple[int, ...]:
    """``(1,) * len(window)``: the trailing window axes of a conv's output-side factor."""
    return (1,) * len(self.window)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One jaxpeft leaf -> one PEFT tensor (``shared``: a slice of a model-level buffer)."""

  peft_name: str
  to_torch: Callable[[np.ndarray], np.ndarray]
  shared: bool = False


def _no_fields(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict[str, Any]:
  return {}


def _no_options(
    peft_config: Mapping[str, Any], paths: Mapping[str, str], leaves: Mapping[str, Any], conv_paths: Sequence[str]
) -> dict[str, Any]:
  return {}


@dataclasses.dataclass(frozen=True)
class PeftMapping:
  """A method's PEFT counterpart.

  Attributes:
    peft_type: PEFT's ``peft_type`` (``"LORA"``...).
    layer_kinds: the layer kinds PEFT supports for it (``"linear"``, ``"conv"``, ``"embedding"``).
    rules: ``rules(layout, target) -> {leaf name: Rule}`` for every leaf the method can have on a layer;
      ``target`` is None when only the PEFT tensor names are needed.
    config_fields: ``(config, targets, modules) -> dict``: the method's fields of ``adapter_config.json``
      (added to ``peft_type``, ``target_modules``...; ``modules``: Flax path -> torch module name).
    import_options: ``(peft_config, paths, leaves, conv_paths) -> AdapterConfig.options`` on import
      (``paths``: adapted Flax path -> module name; ``leaves``: the base leaves by path).
    claims: whether an adapter of ``peft_type`` with this config is this method (LoRA vs DoRA).
    alpha_field, dropout_field: PEFT's names of alpha and of the adapter dropout (None: no dropout).
    shared_shapes: ``targets -> {buffer name: shape}`` of model-level buffers (VeRA, RandLoRA).
    layer_copies_of_shared: PEFT also writes each layer's view of the shared buffers (RandLoRA).
    complete_options: ``(options, targets) -> options`` once the imported config's targets are known.
  """

  peft_type: str
  layer_kinds: tuple[str, ...]
  rules: Callable[[Layout, Target | None], dict[str, Rule]]
  config_fields: Callable[[AdapterConfig, Sequence[Target], Mapping[str, str]], dict[str, Any]] = _no_fields
  import_options: Callable[..., dict[str, Any]] = _no_options
  claims: Callable[[Mapping[str, Any]], bool] = lambda peft_config: True
  alpha_field: str = "alpha"
  dropout_field: str | None = None
  shared_shapes: Callable[[Sequence[Target]], dict[str, tuple[int, ...]]] = lambda targets: {}
  layer_copies_of_shared: bool = False
  complete_options: Callable[[dict[str, Any], Sequence[Target]], dict[str, Any]] = lambda options, targets: options


def input_side(x: np.ndarray, window: tuple[int, ...], channels: int) -> np.ndarray:
  """``(prod(window)*channels, k)`` with rows ordered (window, channels) -> torch ``(k, channels, *window)``."""
  nw = len(window)
  return x.reshape(*window, channels, -1).transpose(nw + 1, nw, *range(nw))


def flat(x: np.ndarray) -> np.ndarray:
  return x.reshape(x.shape[0], -1)


def transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def same(x: np.ndarray) -> np.ndarray:
  return x


def per_module(
    targets: Sequence[Target], value: Callable[[Target], Any], default: Any, modules: Mapping[str, str]
) -> dict[str, Any]:
  """PEFT pattern dict ``{"^<module>": value}`` for the targets whose value differs from ``default``."""
  return {f"^{re.escape(modules[t.path])}": value(t) for t in targets if value(t) != default}


def peft_alpha(alpha: float, rank: int, use_rslora: bool, rslora_native: bool) -> float:
  """PEFT's alpha giving jaxpeft's scale (rsLoRA folded into alpha where PEFT has no ``use_rslora``)."""
  return alpha * math.sqrt(rank) if use_rslora and not rslora_native else alpha


def rank_fields(
    config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str], *, rslora_native: bool
) -> dict[str, Any]:
  """``r``, ``rank_pattern``, ``alpha_pattern`` and the default alpha (key ``"alpha"``), per-layer ranks."""
  default_alpha = peft_alpha(config.alpha, config.rank, config.use_rslora, rslora_native)
  alpha = lambda t: peft_alpha(t.alpha, t.rank, t.use_rslora, rslora_native)
  return {
      "r": config.rank,
      "rank_pattern": per_module(targets, lambda t: t.rank, config.rank, modules),
      "alpha_pattern": per_module(targets, alpha, default_alpha, modules),
      "alpha": default_alpha,
  }


def spatial_axes_option(leaves: Mapping[str, Any], conv_paths: Sequence[str]) -> dict[str, Any]:
  """``{"spatial_axes": n}`` for conv targets of ``n`` window axes (LoKr, (IA)^3), else ``{}``."""
  spatial = {leaves[p].ndim - 2 for p in conv_paths}
  return {"spatial_axes": spatial.pop()} if spatial else {}
