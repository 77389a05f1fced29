"""``AdapterConfig``: the JSON-serialisable record that defines an adapter and rebuilds its structure.

The config is frozen and hashable (pattern dicts are stored as key-sorted tuples of pairs: the order of
patterns never matters, see below), so it can be a static
argument of ``jax.jit``. ``to_json`` / ``from_json`` round-trip it exactly; adapter checkpoints store it.

Patterns (``rank_pattern``, ``alpha_pattern``, ``fan_in_axes``, ``stacked_axes``) map a regex, matched with
``re.fullmatch`` against the '/'-joined leaf path, to a value. If several patterns of one field match a
leaf with different values, that is an error naming the leaf (no silent precedence rules).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern", "fan_in_axes", "stacked_axes")


def _as_pairs(name: str, value: Any) -> tuple[tuple[str, Any], ...]:
  if isinstance(value, Mapping):
    items = list(value.items())
  else:
    items = [tuple(item) for item in value]
  for item in items:
    if len(item) != 2 or not isinstance(item[0], str):
      raise TypeError(f"AdapterConfig.{name} must be a dict of str -> value, got item {item!r}.")
  return tuple(sorted(((k, tuple(v) if isinstance(v, list) else v) for k, v in items), key=lambda kv: kv[0]))


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which leaves get which adapter, and the method's hyperparameters.

  Attributes:
    method: registered method name (``"lora"``, ``"dora"``, ...; see ``jaxpeft.adapters.core``).
    targets: regex over '/'-joined parameter paths, e.g. ``r".*attention/(query|value)/kernel"``.
    rank: default rank ``r`` (PEFT ``r``).
    alpha: default ``alpha`` (PEFT ``lora_alpha``); scale ``alpha/r`` or, with ``use_rslora``, ``alpha/sqrt(r)``.
    dropout: dropout rate on the adapter branch's *input* (PEFT ``lora_dropout``). Only the activation-hook
      mode (``jaxpeft.adapters.factored``) can drop inputs; the reparameterized ``apply`` ignores it.
    use_rslora: rank-stabilised scaling (Kalajdzievski 2023).
    init: init scheme, method-specific (LoRA: ``"default"``, ``"gaussian"``, ``"random"``, ``"pissa"``,
      ``"pissa_niter_<k>"``).
    rank_pattern / alpha_pattern: regex -> per-leaf rank / alpha overrides.
    fan_in_axes: regex -> number of input axes of a layer's leaf (needed for leaves with more than two
      axes: DenseGeneral, Conv); 2-D leaves default to 1, 1-D leaves to 0.
    stacked_axes: regex -> number of leading stacked-layer axes (scanned layers); default 0.
    options: method-specific options (keys must be in the method's ``option_defaults``).
  """

  targets: str
  method: str = "lora"
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  use_rslora: bool = False
  init: str = "default"
  rank_pattern: Any = ()
  alpha_pattern: Any = ()
  fan_in_axes: Any = ()
  stacked_axes: Any = ()
  options: Any = ()

  def __post_init__(self):
    for name in _PATTERN_FIELDS + ("options",):
      object.__setattr__(self, name, _as_pairs(name, getattr(self, name)))
    object.__setattr__(self, "alpha", float(self.alpha))
    object.__setattr__(self, "dropout", float(self.dropout))
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"AdapterConfig.rank must be a positive int, got {self.rank!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout}.")
    for name in ("targets",) + _PATTERN_FIELDS:
      regexes = [self.targets] if name == "targets" else [k for k, _ in getattr(self, name)]
      for regex in regexes:
        try:
          re.compile(regex)
        except re.error as e:
          raise ValueError(f"AdapterConfig.{name}: invalid regex {regex!r}: {e}.") from None
    for _, r in self.rank_pattern:
      if not isinstance(r, int) or r < 1:
        raise ValueError(f"AdapterConfig.rank_pattern values must be positive ints, got {r!r}.")

  def pattern_value(self, field: str, path: str, default: Any) -> Any:
    """The value of pattern ``field`` for leaf ``path`` (``default`` when no regex matches)."""
    values = {repr(v): v for regex, v in getattr(self, field) if re.fullmatch(regex, path)}
    if len(values) > 1:
      raise ValueError(
          f"Ambiguous AdapterConfig.{field} for leaf {path!r}: several patterns match with different "
          f"values {sorted(values)}. Make the regexes disjoint."
      )
    return next(iter(values.values()), default)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-compatible dict (pattern fields as dicts)."""
    out = dataclasses.asdict(self)
    for name in _PATTERN_FIELDS + ("options",):
      out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in getattr(self, name)}
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "AdapterConfig":
    """Inverse of ``to_dict``; unknown keys are an error."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(
          f"Unknown AdapterConfig fields {sorted(unknown)}; this checkpoint may come from " "a newer jaxpeft."
      )
    return cls(**data)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "AdapterConfig":
    return cls.from_dict(json.loads(text))
