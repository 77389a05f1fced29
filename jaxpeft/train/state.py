"""The train state: trainable params, frozen params, model state, optimizer state, step and RNG key."""

from typing import Any

import flax.struct
import jax
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to continue exactly where it stopped.

  Attributes:
    step: number of optimizer updates applied so far.
    params: the trainable parameters (the whole model, or only the adapter leaves).
    frozen: parameters that are read but never differentiated (e.g. the base model under an
      adapter); an empty dict for full fine-tuning. The optimizer holds no state for them.
    opt_state: the optimizer's state, for `params` only.
    rng: the run's base PRNG key; step `s` uses `fold_in(rng, s)`, so the randomness of a step
      does not depend on how many devices or restarts came before it.
    model_state: the model's mutable collections other than params, e.g. `{'batch_stats': ...}` of
      BatchNorm; updated by the train step, never differentiated; `{}` for models without any.
  """

  step: jax.Array
  params: PyTree
  frozen: PyTree
  opt_state: optax.OptState
  rng: jax.Array
  model_state: PyTree = flax.struct.field(default_factory=dict)
