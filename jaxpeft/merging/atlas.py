"""aTLAS: task vectors composed with a learned coefficient per task and per parameter block.

    θ(Λ) = θ_0 + Σ_i Σ_b λ_{i,b} τ_{i,b}          (block b = one leaf of the tree: a weight or a bias)
    Λ*   = argmin_Λ  E_batch loss(θ(Λ), batch)      trained with any optax optimizer, θ_0 and τ_i frozen

Zhang, Dong, Xu, Wang, Lin, Yang, Tsang, Hengel, Zhou, "Knowledge Composition using Task Vectors with
Learned Anisotropic Scaling", NeurIPS 2024, arXiv:2407.02880; reference code fredzzhang/atlas (one learnable
coefficient per task vector per parameter tensor, initialised at zero, trained with AdamW on a few-shot
cross-entropy or an unsupervised objective). ``loss_fn`` is any differentiable objective (supervised or
not); only the ``(num_tasks, num_blocks)`` coefficients get gradients and optimizer state. Deviation: the
reference trains coefficients with its own data loop and mixed precision; this is a plain jitted optax loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxpeft.merging.coefficients import fit_coefficients
from jaxpeft.merging.trees import PyTree, leaf_path, map_leaves


def num_blocks(tree: PyTree) -> int:
  return len(jax.tree_util.tree_leaves(tree))


def atlas_merge(base: PyTree, task_vectors: Sequence[PyTree], coefficients: jax.Array) -> PyTree:
  """``θ_0 + Σ_i λ_{i,b} τ_{i,b}`` with ``coefficients`` of shape ``(num_tasks, num_blocks)`` (tree leaf order)."""
  expected = (len(task_vectors), num_blocks(base))
  if tuple(coefficients.shape) != expected:
    raise ValueError(
        f"coefficients must have shape (num_tasks, num_blocks) = {expected}, got " f"{tuple(coefficients.shape)}."
    )
  block = {leaf_path(kp): i for i, (kp, _) in enumerate(jax.tree_util.tree_leaves_with_path(base))}

  def leaf(path, b, ts):
    return (b + sum(coefficients[i, block[path]] * t for i, t in enumerate(ts))).astype(b.dtype)

  return map_leaves(leaf, base, task_vectors, "task vector")


def fit_atlas(
    base: PyTree,
    task_vectors: Sequence[PyTree],
    loss_fn: Callable[[PyTree, Any], jax.Array],
    batches: Iterable[Any],
    optimizer: optax.GradientTransformation,
    *,
    init: float = 0.0,
) -> jax.Array:
  """The learned ``(num_tasks, num_blocks)`` coefficients after one optimizer step per batch."""
  coefficients = jnp.full((len(task_vectors), num_blocks(base)), init, jnp.float32)
  atlas_merge(base, task_vectors, coefficients)  # checks structure and shapes before compiling
  loss = lambda c, frozen, batch: loss_fn(atlas_merge(*frozen, c), batch)
  return fit_coefficients(coefficients, loss, batches, optimizer, frozen=(base, list(task_vectors)))
