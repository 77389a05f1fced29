"""Task arithmetic: add a weighted sum of task vectors to the base.

    θ = θ_0 + λ Σ_i w_i τ_i,    τ_i = θ_i - θ_0          (divided by Σ_i w_i when ``normalize``)

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089. Equal to PEFT's
``peft.utils.merge_utils.task_arithmetic`` (Σ w_i τ_i) and mergekit 0.1.5's ``task_arithmetic``
(``lambda`` = λ, ``normalize`` divides by Σ w_i unless it is ~0). With ``density < 1`` every τ_i is first
magnitude-trimmed per leaf: PEFT's ``magnitude_prune`` merge. Computed leaf by leaf (``trees.map_leaves``),
so the task vectors are never held as full trees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from jaxpeft.merging.sparsify import magnitude_trim
from jaxpeft.merging.trees import PyTree, check_densities, map_leaves, per_task, stacked_dims


def weighted_sum(deltas: Sequence, weights: Sequence[float], normalize: bool = False):
  """``Σ_i w_i δ_i`` in float32 (``/ Σ_i w_i`` when ``normalize`` and that sum is not ~0, as mergekit)."""
  total = sum(w * d.astype(jnp.float32) for w, d in zip(weights, deltas))
  denominator = sum(weights)
  return total / denominator if normalize and abs(denominator) >= 1e-8 else total


def task_arithmetic(
    base: PyTree,
    models: Sequence[PyTree],
    weights: float | Sequence[float] = 1.0,
    *,
    scale: float = 1.0,
    normalize: bool = False,
    density: float | Sequence[float] = 1.0,
    stacked_axes: Mapping[str, int] | None = None,
) -> PyTree:
  """``θ_0 + λ Σ_i w_i trim(θ_i - θ_0, d_i)`` for fine-tuned ``models`` of ``base`` (see the module docstring).

  ``stacked_axes`` (``{path regex: leading layer axes}``) makes the trim rank each scanned layer apart.
  """
  w = per_task(weights, len(models), "weights")
  densities = per_task(density, len(models), "density")
  check_densities(densities)

  def leaf(path, b, ms):
    dims = stacked_dims(path, stacked_axes)
    deltas = [magnitude_trim(m - b, d, batch_dims=dims) for m, d in zip(ms, densities)]
    return (b + scale * weighted_sum(deltas, w, normalize)).astype(b.dtype)

  return map_leaves(leaf, base, models)
