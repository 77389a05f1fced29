r"""Tent: fully test-time adaptation by entropy minimisation.

Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by Entropy Minimization",
ICLR 2021 (arXiv:2006.10726). Reference code: DequanWang/tent (`tent.py`).

On each test batch ``x`` (BatchNorm with the batch's statistics), with ``p = softmax(f_theta(x))``:

.. math::  L(\theta) = \frac{1}{B} \sum_i H(p_i), \qquad H(p) = -\sum_c p_c \log p_c, \qquad
           \theta \leftarrow \theta - \mathrm{opt}(\nabla_\theta L)

``theta`` is the affine scale and bias of the normalisation layers (`pattern`); the optimizer is any
optax transformation. Returned logits are those of the forward pass that computed the loss (before
the update), as the reference. Defaults: the reference's CIFAR-10-C setting, Adam(lr=1e-3), one step
per batch (its ImageNet setting is SGD(lr=0.00025, momentum=0.9)).

Deviations: none in the update; BatchNorm running averages are left untouched (the reference sets
them to None).
"""

import dataclasses

import jax
import optax

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  optimizer: optax.GradientTransformation = optax.adam(1e-3)
  pattern: str = core.NORM_AFFINE
  steps: int = 1


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  return core.make_state(params, model_state, config, "tent")


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config = state.config

  def loss_fn(params):
    logits = core.forward(config, core.join(params, state.fixed), state.model_state, images, batch_stats=True)
    return core.softmax_entropy(logits).mean(), logits

  logits = None
  for _ in range(config.steps):
    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = config.optimizer.update(grads, state.opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  return state, logits
