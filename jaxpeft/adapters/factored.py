"""Activation-hook (factored) mode: adapters on linen ``Dense`` / ``DenseGeneral`` calls, ``W + s a b`` never formed.

Inside ``with intercept(params, adapter_params, config, ...)``, every call of a linen ``nn.Dense`` or
``nn.DenseGeneral`` whose kernel is a target of ``config`` returns ``base_output + method.branch(drop(x))``
(``flax.linen.intercept_methods``), plus ``method.apply_bias(bias) - bias`` for methods that adapt the layer's
bias (``AdapterMethod.adapts_bias``); for LoRA that is ``x W + b + s (drop(x) a) b`` -- the ``(d_in, d_out)``
update is never materialised, which saves memory and time on large layers. It reads the very same
``adapter_params`` as ``jaxpeft.adapters.reparam`` and, with dropout off, gives the same outputs.

Dropout (``config.dropout``) is applied here, and only here, to the adapter branch's input, as in PEFT:
pass ``rng`` and ``deterministic=False`` while training. Each target (and each repeated call of it) gets
its own mask from ``fold_in(fold_in(rng, crc32(path)), call_index)``.

Usage (the ``with`` goes *inside* the traced function, adapter params are its arguments)::

    @jax.jit
    def loss_fn(adapter_params, params, batch, rng):
        with factored.intercept(params, adapter_params, config, rng=rng, deterministic=False):
            logits = model.apply({"params": params}, batch["x"])
        return loss(logits, batch["y"])

``params`` must be the linen ``variables['params']`` tree, so that a module at path ``("encoder", "query")``
owns the leaf ``"encoder/query/kernel"``. Limits (each raises a clear error): only ``Dense`` and
``DenseGeneral`` (with ``batch_dims=()`` and contracting the trailing input axes) are intercepted -- Embed
and Conv targets need ``reparam.apply``; stacked (``nn.scan``) targets are not supported here; every
target must be called inside the block (a jit cache hit outside the block would silently skip the
adapters, so this is checked when the block exits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from jaxpeft.adapters import interception
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import fold_bias, get_method, stop_frozen
from jaxpeft.adapters.reparam import AdapterParams, adapter_leaves
from jaxpeft.adapters.selection import path_key, select_targets


def _dropout(rng: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _contracted_axes(module: nn.Module, x: jax.Array, path: str) -> int:
  """Number of trailing input axes the module contracts (validated for DenseGeneral)."""
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(
          f"{path}: DenseGeneral with batch_dims={module.batch_dims} is not supported by the "
          "activation-hook mode; use reparam.apply."
      )
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = sorted(a % x.ndim for a in axis)
    if axes != list(range(x.ndim - len(axes), x.ndim)):
      raise ValueError(
          f"{path}: DenseGeneral contracting axes {module.axis} are not the trailing input "
          "axes; use reparam.apply for this target."
      )
    return len(axes)
  return 1


@contextlib.contextmanager
def intercept(
    params: Any,
    adapter_params: AdapterParams,
    config: AdapterConfig,
    *,
    rng: jax.Array | None = None,
    deterministic: bool = True,
) -> Iterator[None]:
  """Context manager adding the adapter branch to targeted linen Dense/DenseGeneral calls.

  Args:
    params: the base linen ``variables['params']`` (used to resolve targets; the kernels themselves are
      read from the module being called).
    adapter_params: as created by ``reparam.init``.
    config: the adapter's config; its method must implement ``AdapterMethod.branch``.
    rng: PRNG key for the branch-input dropout; required when ``deterministic=False`` and
      ``config.dropout > 0``.
    deterministic: if True, no dropout.
  """
  method = get_method(config.method)
  targets = select_targets(config, params)
  other = sorted(t.path for t in targets if t.path.rpartition("/")[2] not in ("kernel", "embedding"))
  if other:
    raise ValueError(
        f"Targets {other} are not Dense / DenseGeneral kernels; the activation-hook mode adapts "
        "only those. Use reparam.apply."
    )
  by_path = adapter_leaves(adapter_params, targets)
  use_dropout = config.dropout > 0.0 and not deterministic
  if use_dropout and rng is None:
    raise ValueError("intercept(..., deterministic=False) with config.dropout > 0 needs an rng key.")
  calls: dict[str, int] = {}

  def handler(next_fun, args, kwargs, module, target):
    path, leaf_name = target.path, target.path.rpartition("/")[2]
    if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
      raise ValueError(
          f"{path}: the activation-hook mode supports Dense and DenseGeneral targets, got "
          f"{type(module).__name__}; use reparam.apply for it."
      )
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    n_in = _contracted_axes(module, x, path)
    if n_in != target.fan_in_axes:
      raise ValueError(
          f"{path}: the module contracts {n_in} input axes but AdapterConfig.fan_in_axes "
          f"gives {target.fan_in_axes} for this leaf; make them agree."
      )
    x = x.reshape(x.shape[: x.ndim - n_in] + (target.matrix_shape[0],)).astype(jnp.float32)
    if use_dropout:
      key = jax.random.fold_in(jax.random.fold_in(rng, path_key(path)), calls.get(path, 0))
      x = _dropout(key, x, config.dropout)
    calls[path] = calls.get(path, 0) + 1
    kernel = meta.unbox(module.get_variable("params", leaf_name)).reshape(target.matrix_shape).astype(jnp.float32)
    leaves = stop_frozen(method, by_path[path])
    out = method.branch(x, kernel, leaves, target)
    if target.bias_path is not None:
      bias = fold_bias(meta.unbox(module.get_variable("params", "bias")))
      out = out + (method.apply_bias(bias, leaves, target) - bias)
    return y + out.reshape(y.shape).astype(y.dtype)

  with interception.intercept(
      {interception.module_path(t): t for t in targets}, handler, "the activation-hook mode"
  ):
    yield
