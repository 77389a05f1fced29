"""Leaf-wise plumbing shared by the merging methods: input checks and a streaming map over N trees.

Every method is written per leaf: ``merged_leaf = f(base_leaf, [leaf of model 1, ..., leaf of model N])``
and ``map_leaves`` applies it leaf by leaf, chained by ``lax.optimization_barrier`` so that under
``jax.jit`` one leaf's computation ends before the next starts: XLA only needs the inputs, the output and
one leaf's temporaries (task vectors are formed inside each leaf's computation, never as N full trees).
Each leaf keeps its input sharding: nothing is gathered to one host or device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def leaf_path(key_path: tuple[Any, ...]) -> str:
  """``'encoder/layer_0/kernel'`` for a ``jax.tree_util`` key path."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def check_compatible(reference: PyTree, trees: Sequence[PyTree], what: str = "model") -> None:
  """Raises naming the first leaf whose presence or shape differs between ``reference`` and ``trees[i]``."""
  ref = {leaf_path(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(reference)}
  for i, tree in enumerate(trees):
    got = {leaf_path(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    for path in sorted(ref.keys() ^ got.keys()):
      where = f"{what} {i}" if path in got else "the base"
      raise ValueError(
          f"Leaf {path!r} is only in {where}: all trees to merge must have the same structure "
          "(merge the same architecture, or restrict the trees to their shared leaves first)."
      )
    for path, leaf in ref.items():
      if leaf.shape != got[path].shape:
        raise ValueError(
            f"Leaf {path!r} has shape {tuple(got[path].shape)} in {what} {i} but "
            f"{tuple(leaf.shape)} in the base: trees to merge must have the same shapes."
        )
      check_same_devices(path, leaf, got[path], f"{what} {i}")


def _devices(x: Any) -> frozenset | None:
  """The devices a concrete ``jax.Array`` lives on; None for numpy arrays and tracers (placed by jit)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return frozenset(x.sharding.device_set)
  return None


def check_same_devices(path: str, reference: Any, leaf: Any, where: str) -> None:
  """Raises naming ``path`` when ``leaf`` is placed on other devices than the base's leaf (another mesh)."""
  want, got = _devices(reference), _devices(leaf)
  if want is not None and got is not None and want != got:
    raise ValueError(
        f"Leaf {path!r} is on {len(got)} device(s) {sorted(d.id for d in got)} in {where} but on {len(want)} "
        f"device(s) {sorted(d.id for d in want)} in the base: put all trees on the same mesh (jax.device_put "
        "with one NamedSharding per leaf) before merging."
    )


def per_task(value: float | Sequence[float], n: int, name: str) -> list[float]:
  """``value`` broadcast to one float per task, checking a sequence has ``n`` entries."""
  if isinstance(value, (int, float)):
    return [float(value)] * n
  values = [float(v) for v in value]
  if len(values) != n:
    raise ValueError(f"{name} has {len(values)} entries but {n} models are merged: give one per model.")
  return values


def check_densities(densities: Sequence[float]) -> None:
  bad = [d for d in densities if not 0.0 <= d <= 1.0]
  if bad:
    raise ValueError(f"density must be in [0, 1] (the fraction of each task vector's entries kept), got {bad}.")


def after(x: jax.Array, done: jax.Array) -> jax.Array:
  """``x``, but computed from a scalar of ``done``: a data dependency that orders XLA's schedule.

  The added term is an exact zero (also for inf / NaN in ``done``) that XLA cannot fold away.
  (``lax.optimization_barrier`` would say the same, but XLA:CPU expands barriers before scheduling.)
  """
  if done.size == 0:
    return x
  first = done.reshape(-1)[0].astype(jnp.float32)
  zero = jnp.clip(jnp.where(jnp.isnan(first), 0.0, first), -1.0, 1.0) * 0.0
  return x + zero.astype(x.dtype)


def stacked_dims(path: str, stacked_axes: Mapping[str, int] | None) -> int:
  """Leading (scanned-layer) axes of the leaf at ``path``: the value of the first regex that fullmatches, else 0.

  Methods that rank entries (TIES' trim) rank each index of those axes apart: one ranking per layer.
  """
  for pattern, dims in (stacked_axes or {}).items():
    if re.fullmatch(pattern, path):
      return dims
  return 0


def map_leaves(
    fn: Callable[..., jax.Array],
    base: PyTree,
    models: Sequence[PyTree],
    what: str = "model",
    aux: Mapping[str, Sequence[PyTree]] | None = None,
) -> PyTree:
  """``fn(path, base_leaf, model_leaves, **aux_leaves)`` over every leaf, after checking all trees match the base.

  ``aux`` maps a keyword to trees matching the base (masks, Fishers, ...): ``fn`` gets that leaf of each.
  """
  if not models:
    raise ValueError(f"Nothing to merge: give at least one {what}.")
  check_compatible(base, models, what)
  aux = dict(aux or {})
  for name, trees in aux.items():
    check_compatible(base, trees, name)
  flat_models = [jax.tree_util.tree_leaves(m) for m in models]
  flat_aux = {name: [jax.tree_util.tree_leaves(t) for t in trees] for name, trees in aux.items()}
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
  out = []
  for i, (kp, leaf) in enumerate(paths_and_leaves):
    inputs = (leaf, [m[i] for m in flat_models], {k: [t[i] for t in v] for k, v in flat_aux.items()})
    if out:  # leaf i starts after leaf i-1 is done, so XLA reuses one leaf's temporaries for the next
      inputs = (after(inputs[0], out[-1]),) + inputs[1:]
    out.append(fn(leaf_path(kp), inputs[0], inputs[1], **inputs[2]))
  return jax.tree_util.tree_unflatten(treedef, out)
