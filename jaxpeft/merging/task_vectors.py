"""Task vectors: the difference between a fine-tuned model and the base it was fine-tuned from.

    τ = θ_ft - θ_0                      (task_vector)
    θ = θ_0 + Σ_i λ_i τ_i               (add_task_vectors; negative λ "forgets" a task)

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing Models with Task
Arithmetic", ICLR 2023, arXiv:2212.04089 (reference code: mlfoundations/task_vectors, ``TaskVector``,
which subtracts state dicts key by key). Works on any parameter pytree (linen ``params``, nnx ``State``,
adapter trees); an error names the first leaf whose structure or shape differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxpeft.merging.trees import PyTree, check_compatible, map_leaves, per_task


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
  """``τ = finetuned - base`` leaf by leaf."""
  check_compatible(base, [finetuned], "fine-tuned model")
  return jax.tree.map(lambda f, b: f - b, finetuned, base)


def add_task_vectors(
    base: PyTree, task_vectors: Sequence[PyTree], scales: float | Sequence[float] = 1.0
) -> PyTree:
  """``θ_0 + Σ_i λ_i τ_i`` in the base's dtypes."""
  lambdas = per_task(scales, len(task_vectors), "scales")
  return map_leaves(
      lambda _, b, ts: (b + sum(lam * t for lam, t in zip(lambdas, ts))).astype(b.dtype),
      base,
      task_vectors,
      "task vector",
  )
