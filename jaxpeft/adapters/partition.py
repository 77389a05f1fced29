"""The trainable partition: gradients and optimizer state for adapter leaves only.

The adapter is a separate pytree, so there is nothing to mask: differentiate the loss with respect to
``adapter_params`` and hand only that tree to the optimizer. Base params are an ordinary (non-
differentiated) argument -- pass them as a jit argument rather than closing over them, so a large base is
not baked into the compiled program as a constant::

    grad_fn = adapter_value_and_grad(loss_fn, config)      # loss_fn(params, batch) -> scalar

    @jax.jit
    def train_step(adapter_params, opt_state, base_params, batch):
        loss, grads = grad_fn(adapter_params, base_params, batch)
        updates, opt_state = tx.update(grads, opt_state, adapter_params)
        return optax.apply_updates(adapter_params, updates), opt_state, loss

    opt_state = tx.init(adapter_params)   # state for adapter leaves only; no optax.masked needed

Methods with stored-but-untrained leaves (``AdapterMethod.frozen_leaves``) get zero gradients there; to keep
no optimizer state for them either, label the tree::

    tx = optax.multi_transform({"trainable": optax.adam(1e-3), "frozen": optax.set_to_zero()},
                               optimizer_labels(adapter_params, config))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from flax import traverse_util

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import get_method
from jaxpeft.adapters.reparam import AdapterParams, apply


def adapter_value_and_grad(
    loss_fn: Callable[..., Any], config: AdapterConfig, *, has_aux: bool = False
) -> Callable[..., Any]:
  """``f(adapter_params, base_params, *args) -> (value, grad wrt adapter_params)``.

  ``loss_fn(params, *args)`` is the ordinary full-model loss; it receives ``reparam.apply(base_params,
  adapter_params, config)``. With ``has_aux=True`` ``loss_fn`` returns ``(loss, aux)`` as in ``jax.value_and_grad``.
  """

  def adapted_loss(adapter_params, base_params, *args, **kwargs):
    return loss_fn(apply(base_params, adapter_params, config), *args, **kwargs)

  return jax.value_and_grad(adapted_loss, has_aux=has_aux)


def param_count(tree: Any) -> int:
  """Number of scalars in a pytree (e.g. to report the adapter's share of the model)."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def optimizer_labels(adapter_params: AdapterParams, config: AdapterConfig) -> AdapterParams:
  """A tree like ``adapter_params`` with ``"frozen"`` at the method's ``frozen_leaves``, else ``"trainable"``."""
  frozen = get_method(config.method).frozen_leaves
  flat = traverse_util.flatten_dict(adapter_params)
  return traverse_util.unflatten_dict({k: "frozen" if k[-1] in frozen else "trainable" for k in flat})
