"""Pure train and eval steps for classification: `(state, batch) -> (state, metrics)`.

The model is called as `model.apply({'params': params_fn(state.params, state.frozen)},
*[batch[k] for k in input_keys], train=...)`; only `state.params` is differentiated.
Optimizers that need more than the gradient receive optax's extra arguments: the loss as
`value=` (MoMo), the batch objective as `obj_fn=` (AdaHessian) and its gradient as `grad_fn=`
(SAM, TRAM). Under `jax.pmap` pass `axis_name` so gradients and metrics are averaged across
devices; under `jax.jit` with shardings the batch mean is already global.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxpeft.train.state import TrainState

PyTree = Any
ParamsFn = Callable[[PyTree, PyTree], PyTree]


def full_params(params: PyTree, frozen: PyTree) -> PyTree:
  """`params_fn` for full fine-tuning: the trainable params are the model's params."""
  del frozen
  return params


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_keys: tuple[str, ...] = ("image",),
    params_fn: ParamsFn = full_params,
    axis_name: str | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted or pmapped)."""
  tx = optax.with_extra_args_support(tx)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits = model.apply(
          {"params": params_fn(params, state.frozen)},
          *(batch[k] for k in input_keys),
          train=True,
          rngs={"dropout": dropout_rng},
      )
      loss = _cross_entropy(logits, batch["label"]).mean()
      return loss, logits

    def objective(params):
      loss = loss_fn(params)[0]
      return jax.lax.pmean(loss, axis_name) if axis_name else loss

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name:
      grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, value=loss, obj_fn=objective, grad_fn=jax.grad(objective)
    )
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return train_step


def make_eval_step(
    model: nn.Module,
    input_keys: tuple[str, ...] = ("image",),
    params_fn: ParamsFn = full_params,
    axis_name: str | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Returns `eval_step(state, batch) -> sums` of loss, correct predictions and real examples.

  Batches carry a boolean `mask` marking real rows (the last batch of a split is padded), so
  summing over batches and dividing by `count` gives exact metrics over the whole split.
  """

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    logits = model.apply(
        {"params": params_fn(state.params, state.frozen)},
        *(batch[k] for k in input_keys),
        train=False,
    )
    mask = batch["mask"].astype(jnp.float32)
    sums = {
        "loss": jnp.sum(_cross_entropy(logits, batch["label"]) * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
