r"""Test-time batch statistics calibration (alpha-BN): normalise with a mix of source and test statistics.

You, Li, Zhao, "Test-time Batch Statistics Calibration for Covariate Shift", 2021 (arXiv:2110.04065).
Reference code: `AlphaBatchNorm` of mariodoebler/test-time-adaptation (method 'norm_alpha', "BN--0.1";
it builds on bethgelab/robustness' `robusta/batchnorm/bn.py`). Every BatchNorm layer uses

.. math::  \mu = (1 - \alpha) \mu_s + \alpha \mu_t, \qquad \sigma^2 = (1 - \alpha) \sigma_s^2 + \alpha \sigma_t^2,
           \qquad \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

with the source running averages ``mu_s, sigma_s^2`` and the current test batch's mean ``mu_t`` and
*unbiased* variance ``sigma_t^2`` (the reference reads them from a momentum-1 PyTorch BatchNorm, whose
running variance is unbiased). The source statistics act as a prior on the test ones; ``alpha = 1`` is
BN-adapt with unbiased variance, ``alpha = 0`` the source model. No gradient, nothing stored between
batches. Default ``alpha = 0.1`` (the reference's `BN.ALPHA`).

Deviation: the paper writes the mixture with its weight ``alpha`` on the source statistics and also
proposes a loss ("Core") on top of it; we follow the reference code's convention (``alpha`` weighs the
test batch) and implement the calibration alone (gradient methods can be combined with it separately).
"""

import dataclasses

import jax

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  alpha: float = 0.1


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  if not 0 <= config.alpha <= 1:
    raise ValueError(f"alpha_bn: alpha={config.alpha} weighs the test statistics; use a value in [0, 1].")
  core.check_batch_stats(model_state, "alpha_bn")
  return core.TTAState(params={}, fixed=params, model_state=model_state, opt_state=(), extra={}, config=config)


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  core.check_batch(images, "alpha_bn")
  alpha = state.config.alpha

  def normalizer(path, x, source_mean, source_var):
    del path
    mean, var = core.batch_moments(x)
    n = x.size // x.shape[-1]
    return (1 - alpha) * source_mean + alpha * mean, (1 - alpha) * source_var + alpha * var * n / (n - 1)

  logits, _ = core.forward_with_normalizer(state.config, state.fixed, state.model_state, images, normalizer)
  return state, logits
