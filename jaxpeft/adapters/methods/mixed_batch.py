"""The ``"mixed_batch"`` method: a different LoRA adapter per example of a batch, in the activation-hook mode.

Stacking trained adapters and running a batch through them is ``jaxpeft.adapters.mixed_batch`` (``stack``,
``intercept``); the math, PEFT's counterpart and the limits are in its docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.methods.lora import LoRAFactors


@register_method("mixed_batch")
class MixedBatchLoRA(LoRAFactors):
  """Per-example LoRA branch ``s (x_i a[index_i]) b[index_i]`` (zero where ``index_i == -1``).

  Leaves: ``a (n, d_in, r)``, ``b (n, r, d_out)``, ``index (batch,)`` int. Activation-hook mode only: a
  per-example update has no single merged weight.
  """

  frozen_leaves = frozenset({"index"})

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    raise ValueError(
        "mixed_batch adapters are not initialised: build them from trained LoRA adapters with "
        "mixed_batch.stack(base_params, [(config, adapter), ...])."
    )

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    raise ValueError(
        "A mixed batch uses a different adapter per example, so it has no single merged weight; "
        "use mixed_batch.intercept (activation-hook mode), or reparam.apply with one adapter."
    )

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    index = leaves["index"]
    if x.ndim < 2 or x.shape[0] != index.shape[0]:
      raise ValueError(
          f"{target.path}: the layer input has shape {x.shape} but index has {index.shape[0]} "
          "entries; the input's leading axis must be the batch, one index per example."
      )
    n = leaves["a"].shape[0]
    gather = jnp.where(index == -1, 0, jnp.where(index < -1, n, index))  # out of [-1, n): NaN
    a = jnp.take(leaves["a"], gather, axis=0, mode="fill", fill_value=jnp.nan)
    b = jnp.take(leaves["b"], gather, axis=0, mode="fill", fill_value=jnp.nan)
    h = jnp.einsum("b...i,bir->b...r", x, a)
    out = target.scaling * jnp.einsum("b...r,bro->b...o", h, b)
    return jnp.where((index != -1).reshape((-1,) + (1,) * (out.ndim - 1)), out, 0.0)
