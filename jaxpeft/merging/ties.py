"""TIES-Merging: trim each task vector, elect a sign per parameter, average only the agreeing entries.

    τ̂_i = trim(τ_i, d)                                  keep the top-d fraction of |τ_i| (``sparsify``)
    γ    = sgn(Σ_i τ̂_i)        ("total")   or  sgn(Σ_i sgn τ̂_i)  ("frequency"),  γ = +1 where the sum is 0
    A_i  = [sgn τ̂_i = γ]
    τ_m  = Σ_i w_i τ̂_i A_i / max(1, Σ_i A_i)            (disjoint mean)
    θ    = θ_0 + λ τ_m

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS
2023, arXiv:2306.01708 (reference code: prateeksr/TIES-Merging). ``convention="paper"`` is that rule with
per-task weights ``w_i``, exactly as Hugging Face PEFT's ``peft.utils.merge_utils.ties`` computes it (sign
elected on the unweighted trimmed vectors, weights applied in the disjoint mean). ``convention="mergekit"``
is mergekit 0.1.5's ``ties`` (``generalized_task_arithmetic``): the weights are applied *before* the
election (e_i = w_i τ̂_i, γ from e_i), the disjoint sum is divided by Σ_i w_i A_i (``normalize``) and the
trim keeps at least one entry (k = max(1, int(d n))).

Deviations: the paper ranks magnitudes over the whole flattened model per task; PEFT, mergekit and this
module rank per tensor (per leaf, or per layer with ``batch_dims``). The sign is elected per leaf in a
stream over the N task vectors, which are formed inside each leaf (never as N full trees).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from jaxpeft.merging.sparsify import magnitude_trim
from jaxpeft.merging.trees import PyTree, check_densities, map_leaves, per_task, stacked_dims

SignMethod = Literal["total", "frequency"]
Convention = Literal["paper", "mergekit"]


def _check(majority_sign_method: str, convention: str) -> None:
  if majority_sign_method not in ("total", "frequency"):
    raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
  if convention not in ("paper", "mergekit"):
    raise ValueError(f"convention must be 'paper' (= PEFT) or 'mergekit', got {convention!r}.")


def sign_consensus(
    deltas: Sequence[jax.Array],
    weights: Sequence[float],
    majority_sign_method: SignMethod = "total",
    convention: Convention = "paper",
    normalize: bool = True,
) -> jax.Array:
  """Elect a sign per entry of the (already sparsified) ``deltas`` and merge the agreeing ones (docstring)."""
  _check(majority_sign_method, convention)
  f32 = [d.astype(jnp.float32) for d in deltas]
  voters = f32 if convention == "paper" else [w * d for w, d in zip(weights, f32)]
  if majority_sign_method == "total":
    mass = sum(voters)
  else:
    mass = sum(jnp.sign(v) for v in voters)
  elected = jnp.where(mass >= 0, 1.0, -1.0)
  agree = [jnp.sign(v) == elected for v in voters]
  mixed = sum(jnp.where(a, w * d, 0.0) for a, w, d in zip(agree, weights, f32))
  if not normalize:
    return mixed
  if convention == "paper":
    return mixed / jnp.maximum(sum(a.astype(jnp.float32) for a in agree), 1.0)
  divisor = sum(jnp.where(a, w, 0.0) for a, w in zip(agree, weights))
  return mixed / jnp.where(divisor == 0, 1.0, divisor)


def ties_deltas(
    deltas: Sequence[jax.Array],
    weights: Sequence[float],
    density: float | Sequence[float],
    majority_sign_method: SignMethod = "total",
    convention: Convention = "paper",
    normalize: bool = True,
    batch_dims: int = 0,
) -> jax.Array:
  """The TIES-merged update of same-shape updates ``deltas`` (``batch_dims`` leading axes ranked apart)."""
  densities = per_task(density, len(deltas), "density")
  check_densities(densities)
  min_keep = 1 if convention == "mergekit" else 0
  trimmed = [magnitude_trim(d, k, batch_dims=batch_dims, min_keep=min_keep) for d, k in zip(deltas, densities)]
  return sign_consensus(trimmed, weights, majority_sign_method, convention, normalize)


def ties(
    base: PyTree,
    models: Sequence[PyTree],
    weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.2,
    *,
    scale: float = 1.0,
    majority_sign_method: SignMethod = "total",
    convention: Convention = "paper",
    normalize: bool = True,
    stacked_axes: Mapping[str, int] | None = None,
) -> PyTree:
  """``θ_0 + λ τ_m`` for fine-tuned ``models`` of ``base``; ``density`` and ``weights`` per model or shared.

  Args:
    base: the pre-trained parameters every model was fine-tuned from.
    models: the fine-tuned parameter trees (same structure and shapes as ``base``).
    weights: ``w_i`` (scalar: the same for all).
    density: fraction of each task vector's entries kept by the trim, in [0, 1].
    scale: ``λ`` (mergekit's ``lambda``).
    majority_sign_method: "total" (sum of values, the paper) or "frequency" (count of signs).
    convention: "paper" (= PEFT) or "mergekit"; see the module docstring.
    normalize: divide by the agreeing count ("paper") or weight ("mergekit"); mergekit's ``normalize``.
    stacked_axes: ``{path regex: number of leading layer axes}`` for scanned layers: the trim ranks each
      layer apart (as for unstacked layers) instead of the whole stacked leaf.
  """
  w = per_task(weights, len(models), "weights")
  check_densities(per_task(density, len(models), "density"))
  _check(majority_sign_method, convention)

  def leaf(path, b, ms):
    merged = ties_deltas(
        [m - b for m in ms],
        w,
        density,
        majority_sign_method,
        convention,
        normalize,
        batch_dims=stacked_dims(path, stacked_axes),
    )
    return (b + scale * merged).astype(b.dtype)

  return map_leaves(leaf, base, models)
