"""`--config.<key>=<value>` overrides, parsed by the harness rather than by ml_collections.

ml_collections' config flags cannot set a field to None (`--config.optimizer.weight_decay=None` fails
to parse as a float) and cannot add keys, and a mistyped key gives a 40-line traceback. Here:

* `None` (or `none`) sets any field to None; `true`/`false` are booleans; other values are Python
  literals (`1e-3`, `(32, 64)`, `'adamw'`) or, when they are not one, strings. A value is converted
  to the type of the field it replaces (an int for a float field, `32,64` for a tuple field).
* Sections that are open dicts (`OPEN_SECTIONS`: a factory's arguments, a method's options) accept
  new keys: `--config.optimizer.kwargs.rho=0.1`.
* Any other unknown key fails with one line naming the nearest valid keys.
"""

import ast
import difflib
from typing import Any, Sequence

import ml_collections

from jaxpeft.train.errors import UserError

PREFIX = "--config."
# Dicts whose keys are arguments of something chosen at run time (new keys allowed).
OPEN_SECTIONS = ("optimizer.kwargs", "adapter.options", "adapter.penalty", "adapter.update")


class ConfigOverrideError(UserError):
  """A `--config.<key>=<value>` that names no key of the config or has a value of the wrong type."""


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.<key>=<value>` arguments from the others (kept in order)."""
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith(PREFIX):
      key, sep, value = arg[len(PREFIX) :].partition("=")
      if not sep:
        raise ConfigOverrideError(f"{arg}: write config overrides as --config.{key}=VALUE.")
      overrides.append((key, value))
    else:
      rest.append(arg)
  return rest, overrides


def _literal(raw: str) -> Any:
  if raw in ("None", "none"):
    return None
  if raw in ("true", "false", "True", "False"):
    return raw in ("true", "True")
  try:
    return ast.literal_eval(raw)
  except (SyntaxError, ValueError):
    return raw


def _convert(key: str, raw: str, current: Any) -> Any:
  """`raw` as a value for the field `key`, whose value is now `current`."""
  value = _literal(raw)
  if value is None or current is None:
    return value
  if isinstance(current, bool):
    if not isinstance(value, bool):
      raise ConfigOverrideError(f"--config.{key}={raw}: expected true or false.")
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, str) and not isinstance(value, str):
    return raw
  if isinstance(current, tuple):
    if isinstance(value, (list, tuple)):
      return tuple(value)
    return tuple(_literal(part.strip()) for part in raw.split(",") if part.strip())
  if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
    return ml_collections.ConfigDict(value)
  if type(value) is not type(current) and not (isinstance(current, int) and isinstance(value, int)):
    raise ConfigOverrideError(
        f"--config.{key}={raw}: expected a {type(current).__name__} like the config's {current!r}."
    )
  return value


def dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key of `config` as a dotted path (sections and leaves)."""
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if isinstance(value, ml_collections.ConfigDict):
      keys += dotted_keys(value, f"{prefix}{name}.")
  return keys


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigOverrideError:
  valid = dotted_keys(config)
  nearest = difflib.get_close_matches(key, valid, n=3, cutoff=0.5) or [k for k in valid if "." not in k]
  return ConfigOverrideError(f"Unknown config key --config.{key}; nearest valid keys: {', '.join(nearest)}.")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
  """Sets each `(dotted key, raw value)` in `config` (see the module docstring for the rules)."""
  for key, raw in overrides:
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(child, ml_collections.ConfigDict):
        raise _unknown_key(config, key)
      node = child
    section = ".".join(parents)
    if leaf not in node:
      if section not in OPEN_SECTIONS:
        raise _unknown_key(config, key)
      with node.unlocked():
        node[leaf] = _literal(raw)
      continue
    value = _convert(key, raw, node[leaf])
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigOverrideError(f"--config.{key}={raw}: {e}") from None
