"""The digits CNN of configs/quickstart.py, trained with any optax transformation in a plain loop.

The optimizer claims (CAME, SAM/ASAM/TRAM) need transformations the harness config cannot
describe (optax.adafactor with momentum, SAM's radius, ASAM's adaptive mode), so they train here
with the harness's own pieces: the quickstart config's model and data, `Trainable`, the pure
`make_train_step` / `make_eval_step`, and the deterministic `BatchLoader`. Constant learning rate,
one device, no checkpoints; the digits splits are held in memory.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import quickstart
from jaxpeft.data import input_pipeline
from jaxpeft.models.registry import build_model
from jaxpeft.train.state import TrainState
from jaxpeft.train.step import make_eval_step, make_train_step
from jaxpeft.train.trainable import Trainable


class DigitsTask:
  """The quickstart digits CNN with its train/test sources; `config` is configs/quickstart.py's."""

  def __init__(self, config: ml_collections.ConfigDict | None = None):
    self.config = config or quickstart.get_config()
    data = self.config.dataset
    self.input_keys = tuple(data.input_keys)
    data_dir = input_pipeline.resolve_data_dir(data.data_dir)
    train_source, self.info = input_pipeline.get_data_source(data.name, data.train_split, data_dir)
    test_source, _ = input_pipeline.get_data_source(data.name, data.eval_split, data_dir)
    # Held in memory (a few hundred kB): the claims read every example many times.
    self.train_source = [train_source[i] for i in range(len(train_source))]
    self.test_source = [test_source[i] for i in range(len(test_source))]
    self.preprocess = input_pipeline.get_preprocess(data.name, data)
    self.model = build_model(self.config.model)
    self.trainable = Trainable.from_config(self.model, self.config)
    self._eval_step = jax.jit(make_eval_step(self.trainable, self.input_keys))

  def noisy_train_source(self, label_noise: float) -> input_pipeline.DataSource:
    """The training split with `label_noise` of its labels flipped (config.dataset.label_noise)."""
    dataset = ml_collections.ConfigDict({**self.config.dataset.to_dict(), "label_noise": label_noise})
    return input_pipeline.with_label_noise(self.train_source, self.info, dataset, self.config.seed)

  def init_state(self, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state (the config's seed) whose optimizer state is `tx`'s."""
    base_rng, split_rng, state_rng = jax.random.split(jax.random.key(self.config.seed), 3)
    example = self.preprocess(input_pipeline.fetch_batch(self.train_source, [0]))
    base = self.model.init(base_rng, *[jnp.asarray(example[k]) for k in self.input_keys])["params"]
    params, frozen = self.trainable.split(split_rng, base)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=self.trainable.optimizer(tx).init(params),
        rng=state_rng,
    )

  def train(
      self,
      tx: optax.GradientTransformation,
      num_steps: int,
      source: input_pipeline.DataSource | None = None,
      *,
      stop_loss: float | None = None,
      check_every: int = 25,
  ) -> tuple[TrainState, np.ndarray]:
    """Trains from `init_state(tx)` for `num_steps` batches of `source` (default: the clean train split).

    With `stop_loss`, training also stops at the first multiple of `check_every` steps where the
    mean loss over the whole of `source` is at most `stop_loss`.

    Returns:
      The final state and the training loss of every step taken (on that step's batch, before the
      update).
    """
    source = source or self.train_source
    tx = self.trainable.optimizer(tx)
    loader = input_pipeline.BatchLoader(
        source, global_batch_size=self.config.batch_size, seed=self.config.seed, preprocess=self.preprocess
    )
    step = jax.jit(make_train_step(self.trainable, tx, self.input_keys))
    state, losses = self.init_state(tx), []
    for i in range(num_steps):
      state, metrics = step(state, loader.batch(i))
      losses.append(metrics["loss"])
      if (
          stop_loss is not None
          and (i + 1) % check_every == 0
          and self.evaluate(state, source)["loss"] <= stop_loss
      ):
        break
    return state, np.asarray(jax.device_get(losses))

  def evaluate(self, state: TrainState, source: input_pipeline.DataSource) -> dict[str, float]:
    """Exact mean loss and accuracy of `state` over the whole of `source`."""
    totals = None
    for batch in input_pipeline.eval_batches(
        source, batch_size=self.config.eval_batch_size, preprocess=self.preprocess
    ):
      sums = self._eval_step(state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return {
        "loss": float(totals["loss"] / totals["count"]),
        "accuracy": float(totals["correct"] / totals["count"]),
    }
