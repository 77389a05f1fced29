r"""BN-adapt: normalise with the test batch's statistics (test-time BatchNorm, no gradient).

Schneider et al., "Improving robustness against common corruptions by covariate shift adaptation",
NeurIPS 2020 (arXiv:2006.16971); Nado et al., "Evaluating Prediction-Time Batch Normalization for
Robustness under Covariate Shift", 2020 (arXiv:2006.10963). Reference: the "BN" baseline of Tent's code
(DequanWang/tent, `norm.py`, with `momentum=None` statistics of the current batch only): every BatchNorm
layer uses

.. math::  \hat x = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta

with the mean and (biased) variance of the current test batch, where the source model uses its
running averages. Nothing is stored between batches. A batch of one image is refused: its
statistics describe that image alone (the papers use batches of 64 and more).
"""

import dataclasses

import jax

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  core.check_batch_stats(model_state, "bn_adapt")
  return core.TTAState(params={}, fixed=params, model_state=model_state, opt_state=(), extra={}, config=config)


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  core.check_batch(images, "bn_adapt")
  return state, core.forward(state.config, state.fixed, state.model_state, images, batch_stats=True)
