"""Fisher-weighted averaging: each model's parameters weighted by its diagonal Fisher information.

    F_i = (1/N) Σ_n E_{y ~ p_θi(y|x_n)} [ (∇_θ log p_θi(y | x_n))² ]          (diagonal Fisher of model i)
    θ*  = Σ_i λ_i F̃_i ⊙ θ_i  /  Σ_i λ_i F̃_i,       F̃_i = max(F_i, floor)

Matena, Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, arXiv:2111.09832; reference
code mmatena/model_merging (``fisher.py``: ``_compute_exact_fisher_for_batch``, ``merging.py``:
``_merge_with_coeffs``), followed exactly: the expectation over y is exact for classifiers (Σ_c p_c g_c²,
``expected_fisher``); with ``normalize_fishers`` each λ_i is divided by the global L2 norm of F_i; the floor
1e-6 applies to every model's Fisher, or only to the first ("target") model's with ``favor_target_model``
(the reference's default, so a parameter no donor model has information about keeps the target's value).
``empirical_fisher`` averages the squared per-example gradients of any per-example log-likelihood (the
labels' log-likelihood: the "empirical Fisher"; or of a sampled y). Per-example gradients are
``jax.vmap(jax.grad(·))`` over each batch, jitted once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.merging.trees import PyTree, map_leaves, per_task


def _accumulate(per_example_sq: Callable[[PyTree, Any], PyTree], params: PyTree, batches: Iterable[Any]) -> PyTree:
  step = jax.jit(lambda p, batch: jax.tree.map(lambda g: g.sum(0), jax.vmap(per_example_sq, (None, 0))(p, batch)))
  total, count = None, 0
  for batch in batches:
    sums = step(params, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    count += jax.tree_util.tree_leaves(batch)[0].shape[0]
  if total is None:
    raise ValueError("The Fisher needs at least one batch of examples; got none.")
  return jax.tree.map(lambda t: t / count, total)


def empirical_fisher(
    log_likelihood_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Iterable[Any]
) -> PyTree:
  """``(1/N) Σ_n (∇ log_likelihood_fn(params, example_n))²``; batches are pytrees with a leading batch axis."""
  grad = jax.grad(log_likelihood_fn)
  return _accumulate(lambda p, ex: jax.tree.map(jnp.square, grad(p, ex)), params, batches)


def expected_fisher(
    logits_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Iterable[Any]
) -> PyTree:
  """The exact diagonal Fisher of a classifier: ``(1/N) Σ_n Σ_c p_c(x_n) (∇ log p_c(x_n))²``.

  ``logits_fn(params, example)`` returns the ``(num_classes,)`` logits of *one* example (no batch axis).
  """

  def per_example(p, example):
    probs = jax.nn.softmax(logits_fn(p, example))
    grads = jax.vmap(jax.grad(lambda q, c: jax.nn.log_softmax(logits_fn(q, example))[c]), (None, 0))(
        p, jnp.arange(probs.shape[-1])
    )
    return jax.tree.map(lambda g: jnp.tensordot(jax.lax.stop_gradient(probs), jnp.square(g), 1), grads)

  return _accumulate(per_example, params, batches)


def fisher_merge(
    models: Sequence[PyTree],
    fishers: Sequence[PyTree],
    weights: float | Sequence[float] = 1.0,
    *,
    fisher_floor: float = 1e-6,
    favor_target_model: bool = True,
    normalize_fishers: bool = True,
) -> PyTree:
  """``Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i`` per parameter (see the module docstring for the options)."""
  if len(fishers) != len(models):
    raise ValueError(f"Got {len(fishers)} Fishers for {len(models)} models: give one Fisher per model.")
  lambdas = per_task(weights, len(models), "weights")
  if normalize_fishers:
    norms = [
        jnp.sqrt(sum(jnp.sum(jnp.square(f)) for f in jax.tree_util.tree_leaves(fisher))) for fisher in fishers
    ]
    lambdas = [lam / norm for lam, norm in zip(lambdas, norms)]

  def leaf(_, first, ms, fisher):
    numerator, denominator = 0.0, 0.0
    for j, (m, f, lam) in enumerate(zip(ms, fisher, lambdas)):
      f = f.astype(jnp.float32)
      if not favor_target_model or j == 0:
        f = jnp.maximum(f, fisher_floor)
      numerator += lam * f * m.astype(jnp.float32)
      denominator += lam * f
    return (numerator / denominator).astype(first.dtype)

  return map_leaves(leaf, models[0], models, aux={"fisher": fishers})
