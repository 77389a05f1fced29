r"""OSTTA: entropy minimisation on the samples whose confidence the adaptation did not lower (open-set TTA).

Lee, Jung, Lee, Park, Shin, Hwang, Yoon, "Towards Open-Set Test-Time Adaptation Utilizing the Wisdom of
Crowds in Entropy Minimization", ICCV 2023 (arXiv:2308.06879). The authors' code is not public (we
found none); the reference followed is the re-implementation in gaozhengqing/UniEnt (`cifar/ostta.py`,
`OSTTA` with `criterion='ent'`, defaults from `cifar/main.py`), by the authors of "Unified Entropy
Optimization for Open-Set Test-Time Adaptation" (CVPR 2024).

The wisdom of crowds: while entropy minimisation raises the confidence of most (known-class) samples,
samples whose confidence *drops* under the adapted model are likely noisy or unknown, and are left out.
Per batch (BatchNorm with batch statistics in both models), with the frozen source model ``f_0`` (its
prediction ``y0_i = argmax p^0_i``) and the adapted model ``f_theta``, ``p = softmax(f_theta(x))``:

.. math::  S = \{ i : p_{i, y0_i} \ge p^0_{i, y0_i} \}, \qquad
           L(\theta) = \frac{1}{|S|} \sum_{i \in S} H(p_i) - \alpha\, H\Big(\frac{1}{B} \sum_i p_i\Big)

(the second term, weight `diversity` ``alpha``, keeps the batch's mean prediction diverse; ``alpha = 0``
is the filter alone). ``theta`` is the norm affine parameters (`pattern`), the optimizer any optax
transformation; logits returned are the adapted model's before the update. Defaults (UniEnt's
`main.py`): Adam(lr=1e-3), one step per batch, ``alpha = 0.5``. The state's `extra` counts `num_backward`
(images in ``S``, summed).

Deviations: the reference's loss is NaN when ``S`` is empty (and its update then poisons the
parameters); here the filtered term is 0 and only the diversity term acts.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  optimizer: optax.GradientTransformation = optax.adam(1e-3)
  pattern: str = core.NORM_AFFINE
  diversity: float = 0.5
  steps: int = 1


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  state = core.make_state(params, model_state, config, "ostta")
  return state.replace(extra={"source": state.params, "num_backward": jnp.array(0)})


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config = state.config
  source_logits = core.forward(
      config, core.join(state.extra["source"], state.fixed), state.model_state, images, batch_stats=True
  )
  source_probs = jax.nn.softmax(source_logits.astype(jnp.float32), -1)
  source_class = jnp.argmax(source_probs, -1)
  source_confidence = jnp.max(source_probs, -1)

  def loss_fn(params):
    logits = core.forward(config, core.join(params, state.fixed), state.model_state, images, batch_stats=True)
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    kept = jnp.take_along_axis(probs, source_class[:, None], -1)[:, 0] >= source_confidence
    mean = probs.mean(0)
    loss = core.masked_mean(core.softmax_entropy(logits), kept) + config.diversity * jnp.sum(mean * jnp.log(mean))
    return loss, (logits, kept)

  logits = None
  for _ in range(config.steps):
    state, (logits, kept) = core.descend(state, loss_fn)
    state = state.replace(extra=dict(state.extra, num_backward=state.extra["num_backward"] + jnp.sum(kept)))
  return state, logits
