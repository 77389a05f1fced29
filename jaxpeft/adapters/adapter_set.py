"""Many named adapters on one model: add, select, delete, combine, apply / merge the active ones, save / load.

``AdapterSet`` is an immutable value (every operation returns a new set) holding ``name -> (AdapterConfig,
adapter_params)`` for one base model, whose parameter *structure* (``jax.eval_shape`` structs, no arrays) it
keeps to validate what is added::

    adapters = AdapterSet.for_model(base_params)
    adapters = adapters.add("math", cfg_math, math_params).add("code", cfg_code, code_params)
    adapters = adapters.combine("both", ["math", "code"], [0.5, 0.5])          # a new LoRA (jaxpeft.merging.lora_updates)
    params = adapters.select("both").apply(base_params)                        # or several: select("math", "code")

Several active adapters are applied in selection order with ``reparam.apply_many`` (for additive methods the
order does not matter; for DoRA it does), as Hugging Face PEFT's ``set_adapter([...])`` sums active LoRAs.

Names. An adapter's name is a file name in a saved set and a key users pass around, so it is refused if it is
empty, is not made of letters, digits, ``_``, ``-``, ``.`` (no ``/``), starts with ``.``, or equals a component
of a base parameter path (``"kernel"``, ``"dense"``, ``"lora"`` if the model has a module called so...): PEFT
stores adapters inside the model's state dict under their names, where such names collided with parameter
keys (huggingface/peft#2699; #3584: an adapter named like a module path segment emptied the saved file);
refusing them keeps checkpoints of both libraries unambiguous.

Saved layout (``save_adapter_set``): a directory with ``adapter_set.json`` (names in insertion order and the
active selection) and one ``<name>.safetensors`` per adapter written by ``checkpoint.save_adapter`` (config,
per-module ``rank_pattern`` included, in its metadata). ``load_adapter_set`` validates every adapter against
the model with ``checkpoint.check_adapter`` (missing / unexpected / wrong shape / wrong dtype).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxpeft.merging import lora_updates as combine_lib
from jaxpeft.adapters import reparam
from jaxpeft.adapters.checkpoint import check_adapter, load_adapter, save_adapter
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.reparam import AdapterParams, Params
from jaxpeft.adapters.selection import named_leaves

_INDEX = "adapter_set.json"
_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterSet:
  """Named adapters of one base model and the active selection (see the module docstring).

  Attributes:
    base_shapes: ``jax.eval_shape``-style structs of the base params (structure, shapes, dtypes only).
    adapters: ``name -> (config, adapter_params)``, in insertion order (read-only mapping).
    active: names of the active adapters, in application order.
  """

  base_shapes: Any
  adapters: Mapping[str, tuple[AdapterConfig, AdapterParams]] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({})
  )
  active: tuple[str, ...] = ()

  @classmethod
  def for_model(cls, base_params: Params) -> "AdapterSet":
    """An empty set for the model whose params are ``base_params``."""
    return cls(jax.eval_shape(lambda p: p, base_params))

  def _replace(
      self, adapters: dict[str, tuple[AdapterConfig, AdapterParams]], active: tuple[str, ...]
  ) -> "AdapterSet":
    return AdapterSet(self.base_shapes, types.MappingProxyType(adapters), active)

  def _check_known(self, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in self.adapters]
    if unknown:
      raise KeyError(f"No adapter named {unknown} in this set; it has {list(self.adapters)}.")

  def validate_name(self, name: str) -> None:
    """Raises ``ValueError`` if ``name`` cannot name an adapter of this model (see the module docstring)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise ValueError(
          f"Invalid adapter name {name!r}: use a non-empty name of letters, digits, '_', '-' "
          "and '.', not starting with '.' (no '/': names are file names and keys)."
      )
    clash = next((p for p, _ in named_leaves(self.base_shapes) if name in p.split("/")), None)
    if clash is not None:
      raise ValueError(
          f"Adapter name {name!r} collides with a component of the base parameter path "
          f"{clash!r}; adapter names must not equal parameter or module names. Choose "
          f"another name (e.g. {name + '_adapter'!r})."
      )

  def add(self, name: str, config: AdapterConfig, adapter_params: AdapterParams) -> "AdapterSet":
    """A set with adapter ``name`` added (inactive). The adapter is checked against the base structure."""
    self.validate_name(name)
    if name in self.adapters:
      raise ValueError(f"An adapter named {name!r} already exists; delete it first or pick another name.")
    check_adapter(adapter_params, config, self.base_shapes)
    return self._replace({**self.adapters, name: (config, adapter_params)}, self.active)

  def select(self, *names: str) -> "AdapterSet":
    """A set whose active adapters are ``names`` (applied in this order); ``select()`` deactivates all."""
    self._check_known(names)
    if len(set(names)) != len(names):
      raise ValueError(f"Adapter names repeated in select{names}; each adapter can be active once.")
    return self._replace(dict(self.adapters), tuple(names))

  def delete(self, name: str) -> "AdapterSet":
    """A set without adapter ``name`` (also removed from the active selection)."""
    self._check_known([name])
    return self._replace(
        {k: v for k, v in self.adapters.items() if k != name}, tuple(n for n in self.active if n != name)
    )

  def combine(self, name: str, names: Sequence[str], weights: Sequence[float], **kwargs: Any) -> "AdapterSet":
    """A set with a new LoRA adapter ``name`` = ``combine.combine`` of the named adapters (kwargs passed on)."""
    self._check_known(names)
    params, config = combine_lib.combine(self.base_shapes, [self.adapters[n] for n in names], weights, **kwargs)
    return self.add(name, config, params)

  def apply(self, base_params: Params) -> Params:
    """The base params with the active adapters applied in order (``reparam.apply_many``)."""
    if not self.active:
      raise ValueError(f"No active adapter; call select(name, ...) first (adapters: {list(self.adapters)}).")
    return reparam.apply_many(base_params, [self.adapters[n] for n in self.active])

  def merge(self, base_params: Params) -> Params:
    """Merged weights of the active adapters for zero-overhead inference (same values as ``apply``)."""
    return self.apply(base_params)

  def unmerge(self, merged_params: Params) -> Params:
    """The base weights back from ``merge``'s output (``reparam.unmerge_many``)."""
    return reparam.unmerge_many(merged_params, [self.adapters[n] for n in self.active])


def save_adapter_set(directory: str | os.PathLike, adapter_set: AdapterSet) -> None:
  """Writes ``adapter_set.json`` and one ``<name>.safetensors`` per adapter into ``directory``."""
  os.makedirs(directory, exist_ok=True)
  for name, (config, params) in adapter_set.adapters.items():
    save_adapter(os.path.join(directory, f"{name}.safetensors"), params, config)
  with open(os.path.join(directory, _INDEX), "w") as f:
    json.dump({"adapters": list(adapter_set.adapters), "active": list(adapter_set.active)}, f, indent=1)


def load_adapter_set(directory: str | os.PathLike, base_params: Params) -> AdapterSet:
  """Reads a set written by ``save_adapter_set`` and validates every adapter against ``base_params``."""
  index_path = os.path.join(directory, _INDEX)
  if not os.path.exists(index_path):
    raise FileNotFoundError(
        f"No {_INDEX} in {os.fspath(directory)!r}: not a directory written by "
        "save_adapter_set (single adapters load with checkpoint.load_adapter)."
    )
  with open(index_path) as f:
    index = json.load(f)
  adapter_set = AdapterSet.for_model(base_params)
  for name in index["adapters"]:
    adapter_set.validate_name(name)
    params, config = load_adapter(os.path.join(directory, f"{name}.safetensors"))
    try:
      adapter_set = adapter_set.add(name, config, params)
    except ValueError as e:
      raise ValueError(f"Adapter {name!r} of {os.fspath(directory)!r}: {e}") from None
  return adapter_set.select(*index["active"])
