r"""LAME: Laplacian-regularised output correction (no gradient, no parameter change).

Boudiaf, Mueller, Ben Ayed, Bertinetto, "Parameter-free Online Test-time Adaptation", CVPR 2022
(arXiv:2201.05718). Reference code followed: fiveai/LAME (`src/adaptation/lame.py`: `LAME.run_step`, the
affinity classes, `laplacian_optimization`, `entropy_energy`; defaults `src/config/defaults.py` and
`configs/method/best/LAME/overall_best.yaml`).

For a batch with source probabilities ``p`` (the model is not changed; BatchNorm uses its source
statistics) and L2-normalised penultimate features ``z`` (the pooled activations before the head), LAME
minimises over assignments ``Y``

.. math::  E(Y) = \sum_i \langle Y_i, -\log p_i \rangle - \lambda \sum_{i,j} W_{ij} \langle Y_i, Y_j\rangle
           + \sum_i \langle Y_i, \log Y_i \rangle

by the bound-optimisation fixed point ``Y <- softmax(log(p + 1e-10) + lambda W Y)`` from
``Y = softmax(log(p + 1e-10))``, at most `max_steps` (100) times, stopping once (after the third
iteration) ``|E - E_old| <= 1e-8 |E_old|`` with the reference's energy
``sum(unary Y - lambda^2 (W Y) Y + Y log max(Y, 1e-20))`` (the reference multiplies its already
``lambda``-scaled pairwise term by ``lambda`` again; this equals ``E(Y)`` at the default ``lambda = 1`` and
only moves the stopping point otherwise). Affinities ``W``:

* 'rbf' (default): ``exp(-||z_i - z_j||^2 / (2 sigma^2))``, ``sigma`` the mean over ``i`` of the distance
  to the `knn`-th nearest point (itself included); dense, with ``W_ii = 1`` (the reference's `sigma`
  option is unused by it, so there is none here; ``sigma = 0``: see the deviations);
* 'knn': 1 for the `knn` nearest neighbours of ``i`` (itself excluded), else 0;
* 'linear': ``z_i . z_j``;

``W <- (W + W^T)/2`` with `force_symmetry`. The corrected assignments ``Y`` are returned as
``log Y`` (logits whose softmax is ``Y``). Defaults: the reference's ``rbf``, ``knn = 5``,
``lambda = 1``, no forced symmetry. The model must sow its features (`core.forward_with_features`).

When it helps: the Laplacian term pulls each prediction towards those of its neighbours in the batch. With
the dense rbf affinity each row of ``W`` sums to 8 to 16 on 64-image batches of the Fashion-MNIST ResNet,
so on an i.i.d. batch of a 10-class problem (about 6 images per class) it outweighs the unary term and
drags predictions to the batch's majority classes: error rises above the source model's (the paper's
i.i.d. benchmarks have 1000 classes, where few images per batch share a class). On class-correlated
batches (the reference's non-i.i.d. protocol groups the stream by class) the same pull corrects the
minority of wrong predictions and error falls well below the source model's. Both behaviours are the
reference's: its own functions give the same assignments on these batches.

Deviations:

* where ``sigma = 0`` (a batch of one image, ``knn = 1``, or every point's k-th neighbour at distance 0)
  the reference computes ``exp(-0 / 0)`` and returns NaN assignments (so every argmax is class 0); here
  ``W`` takes the kernel's limit, 1 at distance 0 and 0 elsewhere (one image keeps its source
  prediction);
* the distance of each point to itself is set to exactly 0 (what the reference computes; a compiled
  ``z_i - z_i`` can come out at ~1e-8, which would make ``sigma`` noise when ``knn = 1``);
* a `jax.lax.while_loop` with the same stopping rule instead of a Python loop.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  affinity: str = "rbf"  # 'rbf' | 'knn' | 'linear'
  knn: int = 5
  force_symmetry: bool = False
  bound_lambda: float = 1.0
  max_steps: int = 100


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  if config.affinity not in ("rbf", "knn", "linear"):
    raise ValueError(f"lame: affinity={config.affinity!r}; use 'rbf', 'knn' or 'linear'.")
  return core.TTAState(
      params={}, fixed=params, model_state=model_state or {}, opt_state=(), extra={}, config=config
  )


def affinity(features: jax.Array, config: Config) -> jax.Array:
  """The affinity matrix ``W`` of L2-normalised `features` (see the module docstring)."""
  n = features.shape[0]
  if config.affinity == "linear":
    w = features @ features.T
  else:
    dist = jnp.linalg.norm(features[None, :, :] - features[:, None, :], axis=-1)
    # Exactly 0 on the diagonal, as in the reference (compiled on CPU, XLA's fused z_i - z_i is ~1e-8).
    dist = jnp.where(jnp.eye(n, dtype=bool), 0.0, dist)
    if config.affinity == "rbf":
      kth = -jax.lax.top_k(-dist, min(config.knn, n))[0][:, -1]
      # sigma = 0 (one image, knn = 1, k-th neighbours at distance 0): the kernel's limit, not 0 / 0.
      w = jnp.exp(-(dist**2) / jnp.maximum(2 * jnp.mean(kth) ** 2, jnp.finfo(dist.dtype).tiny))
    else:
      neighbours = jax.lax.top_k(-dist, min(config.knn + 1, n))[1][:, 1:]
      w = jnp.zeros((n, n)).at[jnp.arange(n)[:, None], neighbours].set(1.0)
  return (w + w.T) / 2 if config.force_symmetry else w


def laplacian_optimization(unary: jax.Array, kernel: jax.Array, bound_lambda: float, max_steps: int) -> jax.Array:
  """The fixed-point iterations of the module docstring; returns ``Y``."""

  def energy(y, pairwise):
    return jnp.sum(unary * y - bound_lambda * pairwise * y + y * jnp.log(jnp.clip(y, 1e-20)))

  def body(carry):
    i, y, old_e, _ = carry
    pairwise = bound_lambda * kernel @ y
    y = jax.nn.softmax(-unary + pairwise, axis=-1)
    e = energy(y, pairwise)
    converged = (i > 1) & (jnp.abs(e - old_e) <= 1e-8 * jnp.abs(old_e))
    return i + 1, y, jnp.where(converged, old_e, e), converged

  y0 = jax.nn.softmax(-unary, axis=-1)
  init = (jnp.array(0), y0, jnp.array(jnp.inf, unary.dtype), jnp.array(False))
  return jax.lax.while_loop(lambda c: (c[0] < max_steps) & ~c[3], body, init)[1]


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config = state.config
  logits, features = core.forward_with_features(config, state.fixed, state.model_state, images, batch_stats=False)
  unary = -jnp.log(jax.nn.softmax(logits.astype(jnp.float32), -1) + 1e-10)
  z = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  y = laplacian_optimization(unary, affinity(z, config), config.bound_lambda, config.max_steps)
  return state, jnp.log(jnp.clip(y, 1e-20))
