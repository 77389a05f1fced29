"""DARE (Drop And REscale): randomly drop task-vector entries, rescale the rest, then merge linearly or by TIES.

    τ̃_i = τ_i ⊙ m_i / d,   m_i ~ Bernoulli(d)  (d = 1 - p, the kept fraction)
    linear:  θ = θ_0 + λ Σ_i w_i τ̃_i
    ties:    θ = θ_0 + λ · sign_consensus(τ̃_1..τ̃_N)   (TIES' election and disjoint mean, no trim)

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, arXiv:2311.03099 (reference code: yule-BUAA/MergeLM). ``rescale="density"`` with
``convention="paper"`` is PEFT's ``dare_linear`` / ``dare_ties``; ``rescale="l1"`` with ``convention=
"mergekit"`` and ``normalize=False`` is mergekit 0.1.5's ``dare_linear`` / ``dare_ties`` (which rescale to
the L1 norm of τ_i rather than by 1/d). The masks come from ``key`` (``jax.random.bernoulli``, one key per
model and leaf) or are given as ``masks``: one tree of 0/1 keep-masks per model, e.g. to reproduce a
reference's draw or to keep the same drop pattern across merges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import jax

from jaxpeft.merging.sparsify import Rescale, bernoulli_mask, random_drop
from jaxpeft.merging.task_arithmetic import weighted_sum
from jaxpeft.merging.ties import Convention, SignMethod, sign_consensus
from jaxpeft.merging.trees import PyTree, after, check_densities, leaf_path, map_leaves, per_task, stacked_dims


def dare(
    base: PyTree,
    models: Sequence[PyTree],
    weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5,
    *,
    key: jax.Array | None = None,
    masks: Sequence[PyTree] | None = None,
    combination: Literal["linear", "ties"] = "linear",
    rescale: Rescale = "density",
    scale: float = 1.0,
    majority_sign_method: SignMethod = "total",
    convention: Convention = "paper",
    normalize: bool | None = None,
    stacked_axes: Mapping[str, int] | None = None,
) -> PyTree:
  """DARE-merged parameters; exactly one of ``key`` / ``masks`` (see the module docstring).

  ``normalize`` defaults to True for ``ties`` (the disjoint mean) and False for ``linear`` (a plain sum).
  ``stacked_axes`` (``{path regex: leading layer axes}``, scanned layers) makes the ``"l1"`` rescale use each
  layer's own norms, as for unstacked layers (the drop itself is entrywise).
  """
  n = len(models)
  w = per_task(weights, n, "weights")
  densities = per_task(density, n, "density")
  check_densities(densities)
  if (key is None) == (masks is None):
    raise ValueError("DARE needs exactly one of key= (random masks) or masks= (one keep-mask tree per model).")
  if combination not in ("linear", "ties"):
    raise ValueError(f"combination must be 'linear' or 'ties', got {combination!r}.")
  if masks is not None and len(masks) != n:
    raise ValueError(f"Got {len(masks)} mask trees for {n} models: give one per model.")
  if normalize is None:
    normalize = combination == "ties"
  index = {leaf_path(kp): i for i, (kp, _) in enumerate(jax.tree_util.tree_leaves_with_path(base))}

  def leaf(path, b, ms, mask=None):
    if mask is None:  # the key waits for this leaf's turn (trees.after), so XLA draws one leaf's masks at a time
      leaf_key = jax.random.wrap_key_data(after(jax.random.key_data(jax.random.fold_in(key, index[path])), b))
      keep = [bernoulli_mask(jax.random.fold_in(leaf_key, t), d, b.shape) for t, d in enumerate(densities)]
    else:
      keep = mask
    dims = stacked_dims(path, stacked_axes)
    dropped = [random_drop(m - b, k, d, rescale, batch_dims=dims) for m, k, d in zip(ms, keep, densities)]
    if combination == "linear":
      merged = weighted_sum(dropped, w, normalize)
    else:
      merged = sign_consensus(dropped, w, majority_sign_method, convention, normalize)
    return (b + scale * merged).astype(b.dtype)

  return map_leaves(leaf, base, models, aux=None if masks is None else {"mask": masks})
