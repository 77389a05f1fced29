"""Finding LoRA factor pairs in an adapter tree, for the adapter-aware optimizer rules.

``jaxpeft.adapters`` stores a LoRA target's factors as a dict ``{"a": (..., d_in, r), "b": (..., r,
d_out)}`` at the target's path (see ``jaxpeft/adapters/lora.py``); a target whose leaf is named
``embedding`` (a Flax ``Embed`` table) holds ``a: (vocab, r)`` and ``b: (r, features)``. A pair is a
dict holding exactly the keys ``a`` and ``b``, both arrays. Leaves beside the pairs (a bias, a
DoRA magnitude, a classifier head) are "other".
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

A, B, EMBEDDING_A, EMBEDDING_B, OTHER = "a", "b", "embedding_a", "embedding_b", "other"


def _is_pair(node: Any) -> bool:
  return isinstance(node, Mapping) and set(node) == {"a", "b"} and all(hasattr(node[k], "shape") for k in "ab")


def factor_roles(tree: Any) -> Any:
  """The tree with each leaf replaced by its role: "a", "b", "embedding_a", "embedding_b" or "other".

  Works on trees with ``optax.MaskedNode`` leaves (inside ``optax.masked``): those stay as they are.
  """

  def visit(node: Any, parent_key: Any) -> Any:
    if _is_pair(node):
      prefix = "embedding_" if parent_key == "embedding" else ""
      return {k: prefix + k for k in node}
    if isinstance(node, Mapping):
      return type(node)({k: visit(v, k) for k, v in node.items()})
    return jax.tree.map(lambda _: OTHER, node)

  return visit(tree, None)


def map_pairs(fn: Callable[..., tuple[Any, Any]], updates: Any, params: Any) -> Any:
  """Replaces every pair ``{"a": ga, "b": gb}`` of `updates` by ``fn(ga, gb, a, b, is_embedding)``.

  ``a, b`` are the pair's parameters (same path in `params`); other leaves pass through.
  """

  def visit(u: Any, p: Any, parent_key: Any) -> Any:
    if _is_pair(u):
      new_a, new_b = fn(u["a"], u["b"], p["a"], p["b"], parent_key == "embedding")
      return type(u)({"a": new_a, "b": new_b})
    if isinstance(u, Mapping):
      return type(u)({k: visit(v, p[k], k) for k, v in u.items()})
    return u

  return visit(updates, params, None)


BaseOptimizer = Callable[..., optax.GradientTransformation]


def build_base(
    name: str, base_optimizer: BaseOptimizer, learning_rate: optax.ScalarOrSchedule, weight_decay: Any | None
) -> optax.GradientTransformation:
  """``base_optimizer(learning_rate)``, given ``weight_decay=`` too unless it is None (the base's default)."""
  if weight_decay is None:
    return base_optimizer(learning_rate)
  if "weight_decay" not in inspect.signature(base_optimizer).parameters:
    raise ValueError(
        f"{name}: weight_decay={weight_decay} is set but the base optimizer {base_optimizer!r} takes no "
        "weight_decay; leave it None or give a base that has one (e.g. optax.adamw)."
    )
  return base_optimizer(learning_rate, weight_decay=weight_decay)
