"""Source: the pretrained model, unadapted (the baseline of every TTA table).

Predictions use the source BatchNorm running averages (`train=False`); nothing changes between steps.
"""

import dataclasses

import jax

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  return core.TTAState(
      params={}, fixed=params, model_state=model_state or {}, opt_state=(), extra={}, config=config
  )


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  return state, core.forward(state.config, state.fixed, state.model_state, images, batch_stats=False)
