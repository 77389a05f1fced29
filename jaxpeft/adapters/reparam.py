"""Reparameterization mode: ``init``, ``apply``, ``merge``, ``unmerge`` as pure functions over pytrees.

``adapter_params`` is a nested dict that mirrors the targeted leaves' paths: the adapter of leaf
``"encoder/query/kernel"`` is ``adapter_params["encoder"]["query"]["kernel"] == {"a": ..., "b": ...}``
(leaf names are the method's). The base tree (linen ``variables['params']`` or an nnx ``State``) is never
modified in place; ``apply`` returns a tree of the same structure the unchanged model consumes.

Numerics: each targeted leaf is folded to a ``(d_in, d_out)`` matrix (``jaxpeft.adapters.core``), cast to
float32, adapted by the method in float32 and cast back to the base dtype (bfloat16 bases: the adapter
math and the merge are float32, the result is rounded once). Methods that also adapt the layer's bias
(``AdapterMethod.adapts_bias``: (IA)^3, Hydra) update the kernel's sibling ``bias`` leaf the same way.
Stacked (scanned) leaves are handled by ``vmap`` over their ``stacked_axes`` leading axes; ``init`` draws
an independent key per layer.

Dropout: the reparameterized mode builds weights, not activations, so it cannot drop the adapter
branch's *inputs* as PEFT does; ``config.dropout`` is ignored here. Use the activation-hook mode
(``jaxpeft.adapters.factored``) for training with adapter dropout.

Training (only adapter leaves are differentiated and get optimizer state; no ``optax.masked`` needed)::

    def loss_fn(adapter_params, base_params, batch):
        params = reparam.apply(base_params, adapter_params, config)
        return loss(model.apply({"params": params}, batch["x"]), batch["y"])

    opt_state = tx.init(adapter_params)                                    # adapter leaves only
    grads = jax.grad(loss_fn)(adapter_params, base_params, batch)          # argnums=0: adapter only
    updates, opt_state = tx.update(grads, opt_state, adapter_params)
    adapter_params = optax.apply_updates(adapter_params, updates)

(``jaxpeft.adapters.partition.adapter_value_and_grad`` builds the gradient function.)

Several adapters on one model: ``apply_many(base, [(config_1, adapter_1), (config_2, adapter_2)])`` applies
them in list order, each to the result of the previous one (for additive methods the order does not
matter; for DoRA it does: its norm is taken of the weight it receives). ``unmerge_many`` undoes them in
reverse order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import (
    AdapterMethod,
    Leaves,
    Target,
    fold,
    fold_bias,
    get_method,
    stop_frozen,
    unfold,
    unfold_bias,
)
from jaxpeft.adapters.selection import named_leaves, path_key, path_string, select_targets

Params = Any
AdapterParams = dict[str, Any]


def _per_layer(fn: Callable[..., jax.Array], target: Target) -> Callable[..., jax.Array]:
  """``fn`` mapped over the target's stacked axes (``vmap`` once per stacked axis)."""
  for _ in range(target.stacked_axes):
    fn = jax.vmap(fn)
  return fn


def adapter_leaves(adapter_params: AdapterParams, targets: Sequence[Target]) -> dict[str, Leaves]:
  """``{target path: leaves}`` from the nested ``adapter_params``, checking it matches the targets."""
  flat = traverse_util.flatten_dict(adapter_params, sep="/") if adapter_params else {}
  by_path: dict[str, Leaves] = {}
  for key, value in flat.items():
    path, _, leaf_name = key.rpartition("/")
    by_path.setdefault(path, {})[leaf_name] = value
  expected = {t.path for t in targets}
  missing, unexpected = sorted(expected - set(by_path)), sorted(set(by_path) - expected)
  if missing or unexpected:
    raise ValueError(
        "adapter_params do not match the config's targets on these base params.\n"
        f"  missing adapters for: {missing}\n  unexpected adapters for: {unexpected}\n"
        "Use the same AdapterConfig (and base model) that created the adapter."
    )
  return by_path


def _nest(by_path: dict[str, Leaves]) -> AdapterParams:
  flat = {
      tuple(path.split("/")) + (name,): leaf for path, leaves in by_path.items() for name, leaf in leaves.items()
  }
  return traverse_util.unflatten_dict(flat)


def _init_target(method: AdapterMethod, rng: jax.Array, leaf: jax.Array, target: Target) -> Leaves:
  rng = jax.random.fold_in(rng, path_key(target.path))

  def init_one(key: jax.Array, layer: jax.Array) -> Leaves:
    return method.init(key, fold(layer, target), target)

  if not target.stacked_axes:
    return init_one(rng, leaf)
  keys = jax.random.split(rng, math.prod(target.stack_shape)).reshape(target.stack_shape)
  return _per_layer(init_one, target)(keys, leaf)


def _typed_key(rng: jax.Array) -> jax.Array:
  return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def init(rng: jax.Array, config: AdapterConfig, base_params: Params) -> AdapterParams:
  """Fresh adapter parameters for the leaves of ``base_params`` selected by ``config``.

  Each target gets the key ``fold_in(rng, crc32(path))`` (split again per stacked layer), so adding a
  target does not change the others' draws. Raises for inits that need a residual base (PiSSA):
  use ``init_with_base`` for those.
  """
  base, adapter = init_with_base(rng, config, base_params)
  if base is not base_params:
    raise ValueError(
        f"init={config.init!r} changes the base weights (they become W - s*A0@B0); call "
        "reparam.init_with_base(rng, config, base_params) -> (residual_base, adapter)."
    )
  return adapter


def init_with_base(rng: jax.Array, config: AdapterConfig, base_params: Params) -> tuple[Params, AdapterParams]:
  """``(base, adapter_params)``: like ``init``, and for base-modifying inits (PiSSA) the residual base.

  For ordinary inits the returned base is ``base_params`` itself (same object).
  """
  method = get_method(config.method)
  targets = select_targets(config, base_params)
  leaves = dict(named_leaves(base_params))
  rng = _typed_key(rng)
  adapter = _nest({t.path: _init_target(method, rng, leaves[t.path], t) for t in targets})
  if any(method.modifies_base(t) for t in targets):
    return unmerge(base_params, adapter, config), adapter
  return base_params, adapter


def _map_targets(
    base_params: Params, adapter_params: AdapterParams, config: AdapterConfig, *, unmerging: bool
) -> Params:
  """``base_params`` with each target's kernel (and, for ``adapts_bias`` methods, its bias) applied/unmerged."""
  method = get_method(config.method)
  targets = select_targets(config, base_params)
  by_path = adapter_leaves(adapter_params, targets)
  leaves = dict(named_leaves(base_params))
  kernel_fn, bias_fn = (method.unmerge, method.unmerge_bias) if unmerging else (method.apply, method.apply_bias)
  updates = {}
  for t in targets:
    lv = stop_frozen(method, by_path[t.path])
    updates[t.path] = _per_layer(lambda w, lv, t=t: unfold(kernel_fn(fold(w, t), lv, t), t), t)(leaves[t.path], lv)
    if t.bias_path is not None:
      updates[t.bias_path] = _per_layer(lambda b, lv, t=t: unfold_bias(bias_fn(fold_bias(b), lv, t), b), t)(
          leaves[t.bias_path], lv
      )
  return jax.tree_util.tree_map_with_path(lambda kp, leaf: updates.get(path_string(kp), leaf), base_params)


def apply(base_params: Params, adapter_params: AdapterParams, config: AdapterConfig) -> Params:
  """The adapted parameters ``W' = method.apply(W, adapter)`` for every target (others unchanged).

  For methods that adapt the layer's bias (``AdapterMethod.adapts_bias``) the target's sibling ``bias`` leaf
  becomes ``method.apply_bias(bias, adapter)``. Pure and differentiable in both arguments; safe under
  ``jit``, ``grad``, ``vmap`` and ``pmap``. ``config.dropout`` is not used here (see the module docstring).
  """
  return _map_targets(base_params, adapter_params, config, unmerging=False)


def merge(base_params: Params, adapter_params: AdapterParams, config: AdapterConfig) -> Params:
  """Merged weights for zero-overhead inference: the same computation as ``apply`` (float32, cast once)."""
  return apply(base_params, adapter_params, config)


def unmerge(merged_params: Params, adapter_params: AdapterParams, config: AdapterConfig) -> Params:
  """The base weights back from merged ones (``W = W' - delta`` for additive methods).

  Exact up to float32 rounding for float32 bases; for bfloat16 bases ``merge`` rounded once, so the
  result differs from the original base by about one bfloat16 ulp of ``W'``. Raises for methods that
  cannot be inverted from the merged weights (DoRA).
  """
  return _map_targets(merged_params, adapter_params, config, unmerging=True)


def apply_many(base_params: Params, adapters: Sequence[tuple[AdapterConfig, AdapterParams]]) -> Params:
  """Applies several ``(config, adapter_params)`` in list order (see the module docstring)."""
  params = base_params
  for config, adapter_params in adapters:
    params = apply(params, adapter_params, config)
  return params


def unmerge_many(merged_params: Params, adapters: Sequence[tuple[AdapterConfig, AdapterParams]]) -> Params:
  """Inverse of ``apply_many`` (unmerges in reverse list order)."""
  params = merged_params
  for config, adapter_params in reversed(adapters):
    params = unmerge(params, adapter_params, config)
  return params
