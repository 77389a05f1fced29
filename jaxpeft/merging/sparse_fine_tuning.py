"""Sparse fine-tuning differences (LT-SFT) and their composition by addition.

    φ   = (θ_ft - θ_0) ⊙ m,   m = the K entries of largest |θ_ft - θ_0| over the whole tree (or a given mask)
    θ   = θ_0 + Σ_i φ_i        (compose: e.g. a language SFT plus a task SFT)

Ansell, Ponti, Korhonen, Vulić, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL 2022,
arXiv:2110.07560; reference code cambridgeltl/composable-sft (``SFT.apply``: adds each stored difference to
the model). Lottery-ticket selection there picks the K parameters that changed most in a first full
fine-tuning; ``sparse_difference`` computes that mask (a global magnitude ranking over the tree) or takes one.
Deviation: differences are dense trees with zeros, not sparse tensors (same arithmetic; the global ranking
concatenates the magnitudes of all leaves once).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxpeft.merging.task_vectors import add_task_vectors
from jaxpeft.merging.trees import PyTree, check_compatible


def sparse_difference(
    finetuned: PyTree, base: PyTree, *, num_kept: int | None = None, mask: PyTree | None = None
) -> PyTree:
  """``φ``: the fine-tuning difference restricted to the ``num_kept`` largest changes, or to ``mask``."""
  check_compatible(base, [finetuned], "fine-tuned model")
  diff = jax.tree.map(lambda f, b: f - b, finetuned, base)
  if (num_kept is None) == (mask is None):
    raise ValueError("sparse_difference needs exactly one of num_kept= (global top-K) or mask=.")
  if mask is None:
    total = sum(x.size for x in jax.tree_util.tree_leaves(diff))
    if not 0 < num_kept <= total:
      raise ValueError(f"num_kept must be in [1, {total}] (the number of parameters), got {num_kept}.")
    flat = jnp.concatenate([jnp.abs(x).ravel() for x in jax.tree_util.tree_leaves(diff)])
    threshold = jax.lax.top_k(flat, num_kept)[0][-1]
    mask = jax.tree.map(lambda x: jnp.abs(x) >= threshold, diff)
  check_compatible(base, [mask], "mask")
  return jax.tree.map(lambda d, m: jnp.where(m, d, jnp.zeros_like(d)), diff, mask)


def compose(base: PyTree, differences: Sequence[PyTree]) -> PyTree:
  """``θ_0 + Σ_i φ_i``."""
  return add_task_vectors(base, differences, 1.0)
