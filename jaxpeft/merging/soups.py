"""Model soups: average fine-tuned models of one base, all of them (uniform) or greedily on held-out data.

    uniform:  θ = (1/N) Σ_i θ_i
    greedy:   sort the models by held-out score; soup = {best}; for each next model m:
              keep m if score(mean(soup ∪ {m})) >= score(mean(soup))

Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon, Kornblith, Schmidt,
"Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time", ICML 2022, arXiv:2203.05482; reference code mlfoundations/model-soups (``main.py``, greedy
soup: ties ``>=`` are added). The greedy soup keeps one running sum and one candidate, not all N models,
beyond the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.merging.linear import linear
from jaxpeft.merging.trees import PyTree, check_compatible


def uniform_soup(models: Sequence[PyTree]) -> PyTree:
  """The mean of ``models``."""
  return linear(models, 1.0)


def greedy_soup(models: Sequence[PyTree], score_fn: Callable[[PyTree], float]) -> tuple[PyTree, list[int]]:
  """``(soup, indices of the models in it)``; ``score_fn(params)`` is the held-out score (higher is better)."""
  if not models:
    raise ValueError("Nothing to merge: give at least one model.")
  check_compatible(models[0], models[1:])
  scores = [float(score_fn(m)) for m in models]
  order = sorted(range(len(models)), key=lambda i: -scores[i])
  as_f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  cast = lambda t: jax.tree.map(lambda x, ref: x.astype(ref.dtype), t, models[0])
  total, chosen, best = as_f32(models[order[0]]), [order[0]], scores[order[0]]
  for i in order[1:]:
    candidate_total = jax.tree.map(jnp.add, total, as_f32(models[i]))
    candidate = cast(jax.tree.map(lambda s, n=len(chosen) + 1: s / n, candidate_total))
    score = float(score_fn(candidate))
    if score >= best:
      total, best = candidate_total, score
      chosen.append(i)
  return cast(jax.tree.map(lambda s: s / len(chosen), total)), chosen
