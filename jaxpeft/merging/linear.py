"""Linear merging (weight averaging): a weighted average of the models' parameters.

    θ = Σ_i w_i θ_i / Σ_i w_i          (``normalize=False``: Σ_i w_i θ_i)

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022, arXiv:2203.05482 (equal weights = the uniform soup). Equal to
mergekit 0.1.5's ``linear`` (``normalize`` defaults to True there too). Needs no base model.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxpeft.merging.trees import PyTree, map_leaves, per_task


def linear(models: Sequence[PyTree], weights: float | Sequence[float] = 1.0, *, normalize: bool = True) -> PyTree:
  """The (normalised) weighted sum of ``models``, leaf by leaf, in the first model's dtypes."""
  if not models:
    raise ValueError("Nothing to merge: give at least one model.")
  w = per_task(weights, len(models), "weights")
  if normalize and abs(sum(w)) < 1e-8:
    raise ValueError(f"The weights {w} sum to 0, so they cannot be normalised; pass normalize=False.")
  total = sum(w) if normalize else 1.0

  def leaf(_, first, ms):
    return (sum(wi * m.astype("float32") for wi, m in zip(w, ms)) / total).astype(first.dtype)

  return map_leaves(leaf, models[0], models)
