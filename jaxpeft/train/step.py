"""Pure train and eval steps: `(state, batch) -> (state, metrics)`, for a task's objective.

The task (`config.task`, `objective(task)`) chooses the loss, the training metrics and the evaluation
sums: 'classification' (the default; cross-entropy on `batch['label']`, described below) or 'causal_lm'
(next-token cross-entropy on the response tokens, `jaxpeft.train.causal_lm`).

Labels may carry spatial axes (dense prediction, e.g. segmentation): logits `(batch, ..., classes)`
with labels `(batch, ...)` give a cross-entropy and an accuracy per position (pixel), averaged over
all positions; eval's per-example `mask` is broadcast over them, and eval also sums each class's
intersection and union for the mean IoU.

The model is called through `Trainable.apply(state.params, state.frozen, inputs, ...)` with
`inputs = [batch[k] for k in input_keys]`; only `state.params` is differentiated. Optimizers
that need more than the gradient receive optax's extra arguments: the loss as `value=` (MoMo),
the batch objective as `obj_fn=` (AdaHessian) and its gradient as `grad_fn=` (SAM, TRAM). Under
`jax.pmap` pass `axis_name` so gradients, metrics and the extra arguments' values are averaged
across devices (the optimizers then need no `axis_name` of their own); under
`jax.jit` with shardings the batch mean is already global.

Models with mutable collections (BatchNorm `batch_stats`, kept in `state.model_state`) run the train step
with batch statistics and return the updated running averages in the new state (averaged across devices
under pmap); eval uses the running averages.

An adapter method's loss term (`Trainable.regularizer`, the method's `loss_term`) is part of the
objective: the metric `loss` is cross-entropy + term (what is differentiated, and what MoMo's `value=`,
AdaHessian's `obj_fn` and SAM's `grad_fn` see), and the term alone is the metric `penalty`. Its random
choice (e.g. one matrix drawn per step) uses a key derived from the step's, so it is the same on every
device and after a resume.

`make_reselect_step` builds the between-steps update of methods that re-select their trained entries
(the method's `reselect` hook): `Trainable.reselect`, then the optimizer state restarts as at step 0,
except that the learning-rate schedule keeps its position (see `restart_optimizer_state`).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.train import causal_lm
from jaxpeft.train.state import TrainState
from jaxpeft.train.trainable import Trainable

Batch = dict[str, jax.Array]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


class Objective(NamedTuple):
  """What a task trains and reports: each a function of the model's logits and the batch."""

  loss: Callable[[jax.Array, Batch], jax.Array]  # the mean loss of a training batch
  train_metrics: Callable[[jax.Array, Batch], dict[str, jax.Array]]  # besides the loss
  eval_sums: Callable[[jax.Array, Batch], dict[str, jax.Array]]  # summed over a split's batches
  finalize_eval: Callable[[dict[str, Any]], dict[str, float]]  # the split's sums -> its metrics


def _classification_eval_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  labels = batch["label"]
  # One weight per label position: the example's mask repeated over its spatial axes.
  mask = jnp.broadcast_to(
      batch["mask"].reshape(batch["mask"].shape + (1,) * (labels.ndim - 1)), labels.shape
  ).astype(jnp.float32)
  predictions = jnp.argmax(logits, -1)
  sums = {
      "loss": jnp.sum(_cross_entropy(logits, labels) * mask),
      "correct": jnp.sum((predictions == labels) * mask),
      "count": jnp.sum(mask),
  }
  if labels.ndim > 1:  # Dense prediction: per-class intersection and union for the mean IoU.
    classes = jnp.arange(logits.shape[-1])
    predicted = (predictions[..., None] == classes) * mask[..., None]
    actual = (labels[..., None] == classes) * mask[..., None]
    axes = tuple(range(labels.ndim))
    sums["intersection"] = jnp.sum(predicted * actual, axes)
    sums["union"] = jnp.sum(jnp.maximum(predicted, actual), axes)
  return sums


def _classification_metrics(totals: dict[str, Any]) -> dict[str, float]:
  """Exact loss and accuracy over the split (per pixel for dense predictions), and `mean_iou` for those.

  `mean_iou`: the mean over classes present in the labels or predictions of intersection / union.
  """
  count = float(totals["count"])
  metrics = {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}
  if "union" in totals:
    present = totals["union"] > 0
    metrics["mean_iou"] = float(np.mean(totals["intersection"][present] / totals["union"][present]))
  return metrics


OBJECTIVES: dict[str, Objective] = {
    "classification": Objective(
        loss=lambda logits, batch: _cross_entropy(logits, batch["label"]).mean(),
        train_metrics=lambda logits, batch: {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])},
        eval_sums=_classification_eval_sums,
        finalize_eval=_classification_metrics,
    ),
    "causal_lm": Objective(
        loss=causal_lm.loss,
        train_metrics=causal_lm.train_metrics,
        eval_sums=causal_lm.eval_sums,
        finalize_eval=causal_lm.finalize_eval,
    ),
}


def objective(task: str) -> Objective:
  """The objective of `config.task`."""
  if task not in OBJECTIVES:
    raise ValueError(f"config.task={task!r}: use one of {sorted(OBJECTIVES)}.")
  return OBJECTIVES[task]


def make_train_step(
    trainable: Trainable,
    tx: optax.GradientTransformation,
    input_keys: tuple[str, ...] = ("image",),
    axis_name: str | None = None,
    task: str = "classification",
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted or pmapped)."""
  tx = optax.with_extra_args_support(tx)
  task_objective = objective(task)

  def train_step(state: TrainState, batch: Batch):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    penalty_rng = jax.random.fold_in(dropout_rng, 1)
    inputs = [batch[k] for k in input_keys]
    mutable = list(state.model_state)  # BatchNorm: normalise by the batch, update the running averages.

    def loss_fn(params):
      out = trainable.apply(
          params,
          state.frozen,
          inputs,
          train=True,
          rng=dropout_rng,
          model_state=state.model_state,
          mutable=mutable or False,
      )
      logits, model_state = out if mutable else (out, state.model_state)
      loss = task_objective.loss(logits, batch)
      penalty = trainable.regularizer(params, state.frozen, penalty_rng)  # None for most methods
      return (loss if penalty is None else loss + penalty), (logits, penalty, model_state)

    def batch_mean(x):
      return jax.lax.pmean(x, axis_name) if axis_name else x

    def objective(params):
      return batch_mean(loss_fn(params)[0])

    def grad_fn(params):
      return batch_mean(jax.grad(lambda p: loss_fn(p)[0])(params))

    def trust_region_logits_fn(params, reference_params, *, train):
      """TRAM's (target, current) logits; `train`: the current ones as the loss's forward computes them."""
      if reference_params is None:
        raise ValueError(
            "The harness computes TRAM's distance against reference parameters;"
            " use reference_decay in [0, 1], not None."
        )
      target = trainable.apply(reference_params, state.frozen, inputs, train=False, model_state=state.model_state)
      current = trainable.apply(
          params,
          state.frozen,
          inputs,
          train=train,
          rng=dropout_rng if train else None,
          model_state=state.model_state,
      )
      return whole_batch((target, current))

    def whole_batch(x):  # TRAM's distance is over the whole batch: gather the logits of every device
      return jax.tree.map(lambda y: jax.lax.all_gather(y, axis_name, tiled=True), x) if axis_name else x

    (loss, (logits, penalty, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    task_metrics = task_objective.train_metrics(logits, batch)
    # Under pmap each device's running averages saw its own shard: averaged, they stay replicated.
    grads, loss, task_metrics, model_state = batch_mean((grads, loss, task_metrics, model_state))
    updates, opt_state = tx.update(
        grads,
        state.opt_state,
        state.params,
        value=loss,
        obj_fn=objective,
        grad_fn=grad_fn,
        trust_region_logits_fn=trust_region_logits_fn,
    )
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        model_state=model_state,
    )
    metrics = {"loss": loss, **task_metrics, "grad_norm": optax.tree.norm(grads)}
    if penalty is not None:
      metrics["penalty"] = penalty
    return new_state, metrics

  return train_step


def make_multi_step(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]],
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` over stacked batches (leading axis K): K steps in one call, metrics stacked along K.

  A `lax.scan`, so one compiled call runs K updates: fewer dispatches and per-call buffer set-ups (XLA:CPU
  maps and unmaps its scratch memory per call). Step k sees the state after step k-1, as K calls would.
  The scan is unrolled: as a loop, XLA:CPU compiled the body's reductions (a bias gradient) in another
  order and the parameters differed from K single steps in the last bit; unrolled they are bit-identical
  (tests/train/loop_steps_per_call_test.py), at K times the compile time.
  """

  def multi_step(state: TrainState, batches: Batch):
    return jax.lax.scan(train_step, state, batches, unroll=True)

  return multi_step


_SCHEDULE_STATES = (optax.ScaleByScheduleState, optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def restart_optimizer_state(
    tx: optax.GradientTransformation, opt_state: optax.OptState, params: optax.Params
) -> optax.OptState:
  """`tx.init(params)`, except that learning-rate schedules keep their position from `opt_state`.

  Moments and step counts (so bias corrections) restart; `ScaleByScheduleState` (optax's
  `scale_by_learning_rate` with a schedule, used by every optax alias and jaxpeft optimizer) and
  the count and hyperparameters of `inject_hyperparams` keep theirs. Optimizers that read their
  schedule from their own step count (MoMo, AdaMod) restart the schedule with it.
  """

  def keep_schedule(fresh, old):
    if isinstance(fresh, optax.ScaleByScheduleState):
      return old
    if isinstance(fresh, _SCHEDULE_STATES):  # inject_hyperparams: its inner state restarts
      return old._replace(inner_state=restart(fresh.inner_state, old.inner_state))
    return fresh

  def restart(fresh, old):
    return jax.tree.map(keep_schedule, fresh, old, is_leaf=lambda x: isinstance(x, _SCHEDULE_STATES))

  return restart(tx.init(params), opt_state)


def make_reselect_step(
    trainable: Trainable, tx: optax.GradientTransformation
) -> Callable[[TrainState], TrainState]:
  """Returns `reselect_step(state) -> state` for methods that re-select their trained entries.

  After `reselect_every` updates the method's `reselect` hook rewrites base and adapter (e.g. merges the
  trained delta into the base and redraws which entries train), and all optimizer state restarts but the
  schedule's position (`restart_optimizer_state`), as a reference that builds a new optimizer while its
  learning-rate scheduler runs on. The model's function does not change. `tx` is the transformation the
  state was made with (`Trainable.optimizer(...)`).
  """

  def reselect_step(state: TrainState) -> TrainState:
    params, frozen = trainable.reselect(state.params, state.frozen)
    return state.replace(
        params=params, frozen=frozen, opt_state=restart_optimizer_state(tx, state.opt_state, params)
    )

  return reselect_step


def make_eval_step(
    trainable: Trainable,
    input_keys: tuple[str, ...] = ("image",),
    axis_name: str | None = None,
    task: str = "classification",
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Returns `eval_step(state, batch) -> sums` of loss, correct predictions and real examples (or tokens).

  Batches carry a boolean `mask` marking real rows (the last batch of a split is padded), so
  summing over batches and dividing by `count` gives exact metrics over the whole split. With
  per-pixel labels the sums count pixels, and `intersection` / `union` (one entry per class)
  are added; the causal LM counts response tokens. `objective(task).finalize_eval` turns the
  split's sums into its metrics.
  """
  eval_sums = objective(task).eval_sums

  def eval_step(state: TrainState, batch: Batch):
    logits = trainable.apply(
        state.params, state.frozen, [batch[k] for k in input_keys], train=False, model_state=state.model_state
    )
    sums = eval_sums(logits, batch)
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
