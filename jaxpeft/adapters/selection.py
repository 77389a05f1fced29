"""Target selection: '/'-joined parameter paths, regex matching, and per-leaf ``Target`` records.

For methods that adapt the layer's bias too (``AdapterMethod.adapts_bias``) the target records the path of
the kernel's sibling leaf ``bias`` (``Target.bias_path``), checked to hold one entry per output feature.

Works on any parameter pytree: linen ``variables['params']`` (nested dicts), nnx ``State`` from
``nnx.split`` (the ``.value`` of each ``nnx.Variable`` is dropped from the path, so an nnx path reads
``layers/0/kernel``), boxed linen params (``nn.Partitioned``, also ``.value``-wrapped) and plain dicts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import Target, get_method


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_string(key_path: tuple[Any, ...]) -> str:
  """'/'-joined path of a ``tree_flatten_with_path`` key path, without a trailing Variable ``.value``."""
  if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value":
    key_path = key_path[:-1]
  return "/".join(_key_name(k) for k in key_path)


def named_leaves(params: Any) -> Iterator[tuple[str, Any]]:
  """Yields ``(path, leaf)`` for every leaf of ``params`` in flattening order."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    yield path_string(key_path), leaf


def path_key(path: str) -> int:
  """A stable 32-bit integer for ``path`` (folded into PRNG keys so each target gets its own stream)."""
  return zlib.crc32(path.encode())


def _default_fan_in_axes(path: str, layer_ndim: int) -> int:
  if layer_ndim == 1:
    return 0
  if layer_ndim == 2:
    return 1
  raise ValueError(
      f"Leaf {path!r} has {layer_ndim} axes per layer, so its input/output split is ambiguous. Add it to "
      "AdapterConfig.fan_in_axes, e.g. fan_in_axes={r'.*(query|key|value)/kernel': 1, "
      "r'.*out/kernel': 2, r'.*conv.*/kernel': <ndim-1>} (DenseGeneral q/k/v (features, heads, head_dim): "
      "1; attention out (heads, head_dim, features): 2; Conv (kh, kw, in, out): ndim-1)."
  )


def _bias_path(
    path: str, shape: tuple[int, ...], stacked: int, d_out: int, leaves: dict[str, Any], config: AdapterConfig
) -> str | None:
  """The path of the kernel's sibling ``bias`` leaf (checked to fit the kernel), or None if there is none."""
  parent, _, _ = path.rpartition("/")
  bias_path = f"{parent}/bias" if parent else "bias"
  if bias_path not in leaves:
    return None
  if re.fullmatch(config.targets, bias_path):
    raise ValueError(
        f"{bias_path!r} is both a target and the bias that method {config.method!r} adapts "
        f"together with {path!r}; narrow AdapterConfig.targets to exclude it."
    )
  bias_shape = tuple(getattr(leaves[bias_path], "shape", ()))
  if bias_shape[:stacked] != shape[:stacked] or math.prod(bias_shape[stacked:]) != d_out:
    raise ValueError(
        f"Bias {bias_path!r} of shape {bias_shape} does not fit kernel {path!r} of shape {shape} "
        f"(expected the stacked axes {shape[:stacked]} then {d_out} output features)."
    )
  return bias_path


def select_targets(config: AdapterConfig, params: Any) -> list[Target]:
  """The ``Target`` records of the leaves of ``params`` whose path fully matches ``config.targets``.

  Raises ``ValueError`` if nothing matches (listing the available paths) or if a matched leaf cannot be
  adapted (naming the leaf and the reason).
  """
  method = get_method(config.method)
  unknown = set(dict(config.options)) - set(method.option_defaults)
  if unknown:
    raise ValueError(
        f"Unknown options {sorted(unknown)} for method {config.method!r}; allowed: "
        f"{sorted(method.option_defaults)}."
    )
  options = tuple(sorted({**method.option_defaults, **dict(config.options)}.items()))
  leaves = list(named_leaves(params))
  by_path = dict(leaves)
  targets = []
  for path, leaf in leaves:
    if not re.fullmatch(config.targets, path):
      continue
    if not hasattr(leaf, "shape") or not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
          f"Target leaf {path!r} is not a floating-point array (got {type(leaf).__name__} "
          f"{getattr(leaf, 'dtype', '')}); narrow AdapterConfig.targets."
      )
    shape = tuple(leaf.shape)
    stacked = config.pattern_value("stacked_axes", path, 0)
    if not 0 <= stacked < len(shape):
      raise ValueError(f"stacked_axes={stacked} for leaf {path!r} of shape {shape} leaves no layer axes.")
    layer_ndim = len(shape) - stacked
    fan_in = config.pattern_value("fan_in_axes", path, None)
    if fan_in is None:
      fan_in = _default_fan_in_axes(path, layer_ndim)
    if not 0 <= fan_in < layer_ndim:
      raise ValueError(
          f"fan_in_axes={fan_in} for leaf {path!r} with per-layer shape "
          f"{shape[stacked:]} must be in [0, {layer_ndim - 1}]."
      )
    rank = config.pattern_value("rank_pattern", path, config.rank)
    target = Target(
        path=path,
        shape=shape,
        dtype=jnp.dtype(leaf.dtype).name,
        stacked_axes=stacked,
        fan_in_axes=fan_in,
        kind="embedding" if path.rsplit("/", 1)[-1] == "embedding" else "kernel",
        rank=rank,
        alpha=float(config.pattern_value("alpha_pattern", path, config.alpha)),
        use_rslora=config.use_rslora,
        dropout=config.dropout,
        init=config.init,
        options=options,
    )
    if method.adapts_bias and target.fan_in_axes:
      target = dataclasses.replace(
          target, bias_path=_bias_path(path, shape, stacked, target.matrix_shape[1], by_path, config)
      )
    method.check_target(target)
    targets.append(target)
  if not targets:
    available = "\n  ".join(f"{p} {tuple(getattr(l, 'shape', ()))}" for p, l in leaves)
    raise ValueError(
        f"AdapterConfig.targets={config.targets!r} matches no parameter (re.fullmatch on "
        f"'/'-joined paths). Available paths:\n  {available}"
    )
  return targets
