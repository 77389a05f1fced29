"""RegMean: merge each linear layer to best reproduce every model's outputs on its own inputs (closed form).

For a linear layer ``y = x W`` (Flax kernel ``W: (d_in, d_out)``) with model i's inputs ``X_i`` (n_i rows):

    W* = argmin_W Σ_i ||X_i W - X_i W_i||²  =  (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i,     G_i = X_iᵀ X_i / n_i
    G̃_i = α G_i + (1 - α) diag(G_i)            (``alpha``: scale of the off-diagonal entries)

Every other parameter (biases, norms, embeddings, layers without a Gram) is averaged. Jin, Ren,
Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
arXiv:2212.09849 (reference code: bloomberg/dataless-model-merging; MergeLM's ``regmean_merging``, which
averages ``xᵀx`` over examples and defaults to α = 1, as here). ``gram_matrices`` captures the inputs of
``nn.Dense`` calls with linen's ``nn.intercept_methods`` (like the adapters' ``corda.collect_covariances``,
but the raw mean ``xᵀx``, without CorDA's max-normalisation). Deviation: the reference inverts with
``torch.linalg.inv``; this solves the linear system (``jnp.linalg.solve``), the same W* when it exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.merging.trees import PyTree, map_leaves

Grams = Mapping[str, jax.Array]


def gram_matrices(
    apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: Iterable[Any], targets: str = r".*"
) -> dict[str, jax.Array]:
  """``{kernel path: mean xᵀx}`` over every input row of each ``nn.Dense`` whose kernel path matches ``targets``.

  Args:
    apply_fn: ``apply_fn(params, batch)`` runs the linen model, e.g.
      ``lambda p, x: model.apply({"params": p}, x)``.
    params: the model's ``params`` tree (each model's own: its Grams use its own activations).
    batches: batches of that model's task inputs.
    targets: a regex over '/'-joined kernel paths (``fullmatch``).
  """
  pattern = re.compile(targets)

  def batch_sums(p, batch):
    sums: dict[str, tuple[jax.Array, int]] = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__" and isinstance(module, nn.Dense) and module.scope is not None:
        path = "/".join(module.path + ("kernel",))
        if pattern.fullmatch(path):
          x = (args[0] if args else kwargs["inputs"]).astype(jnp.float32)
          x = x.reshape(-1, x.shape[-1])
          gram, rows = sums.get(path, (0.0, 0))
          sums[path] = (gram + x.T @ x, rows + x.shape[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      apply_fn(p, batch)
    return {k: g for k, (g, _) in sums.items()}, {k: r for k, (_, r) in sums.items()}

  step = jax.jit(batch_sums)
  totals: dict[str, jax.Array] = {}
  counts: dict[str, int] = {}
  for batch in batches:
    grams, rows = step(params, batch)
    for path, gram in grams.items():
      totals[path] = totals.get(path, 0.0) + gram
      counts[path] = counts.get(path, 0) + int(rows[path])
  if not totals:
    raise ValueError(f"No nn.Dense kernel matching {targets!r} was called by apply_fn; nothing to capture.")
  return {path: totals[path] / counts[path] for path in totals}


def regmean(models: Sequence[PyTree], grams: Sequence[Grams], *, alpha: float = 1.0) -> PyTree:
  """RegMean-merged parameters: the closed form for every kernel with a Gram in all ``grams``, the mean elsewhere.

  Args:
    models: the fine-tuned parameter trees.
    grams: per model, ``gram_matrices`` of that model on its own data (``{kernel path: (d_in, d_in)}``).
    alpha: the off-diagonal scale α in [0, 1] (1: plain RegMean; 0: a diagonal, per-input-feature weighting).
  """
  if len(grams) != len(models):
    raise ValueError(f"Got {len(grams)} Gram dicts for {len(models)} models: give one per model.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha (the off-diagonal scale) must be in [0, 1], got {alpha}.")
  shared = set(grams[0]).intersection(*grams[1:])
  partial = sorted(set().union(*grams) - shared)
  if partial:
    raise ValueError(f"Grams for {partial} are missing for some models; capture the same layers for every model.")

  def leaf(path, first, ms):
    if path not in shared:
      return (sum(m.astype(jnp.float32) for m in ms) / len(ms)).astype(first.dtype)
    if first.ndim != 2 or any(g[path].shape != (first.shape[0],) * 2 for g in grams):
      raise ValueError(
          f"{path}: RegMean needs a (d_in, d_out) kernel and (d_in, d_in) Grams, got kernel "
          f"{first.shape} and Grams {[tuple(g[path].shape) for g in grams]}."
      )
    reduced = [alpha * g[path] + (1 - alpha) * jnp.diag(jnp.diag(g[path])) for g in grams]
    rhs = sum(g @ m.astype(jnp.float32) for g, m in zip(reduced, ms))
    return jnp.linalg.solve(sum(reduced), rhs).astype(first.dtype)

  return map_leaves(leaf, models[0], models)
