"""Learning a few merging coefficients with an optax optimizer while everything else stays frozen.

Shared by the methods that learn how to combine frozen task knowledge (aTLAS' per-block coefficients,
ScaLearn's scaling vectors): one jitted step per batch, gradients and optimizer state only for the
coefficients (any pytree of arrays).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import optax

from jaxpeft.merging.trees import PyTree


def fit_coefficients(
    coefficients: PyTree,
    loss_fn: Callable[[PyTree, PyTree, Any], jax.Array],
    batches: Iterable[Any],
    optimizer: optax.GradientTransformation,
    frozen: PyTree = None,
) -> PyTree:
  """``coefficients`` after one ``optimizer`` step on ``loss_fn(coefficients, frozen, batch)`` per batch.

  ``frozen`` (e.g. the base and the task vectors) is a jit argument, not a constant folded into the program.
  """
  opt_state = optimizer.init(coefficients)

  @jax.jit
  def step(coefficients, opt_state, frozen, batch):
    grad = jax.grad(loss_fn)(coefficients, frozen, batch)
    updates, opt_state = optimizer.update(grad, opt_state, coefficients)
    return optax.apply_updates(coefficients, updates), opt_state

  for batch in batches:
    coefficients, opt_state = step(coefficients, opt_state, frozen, batch)
  return coefficients
