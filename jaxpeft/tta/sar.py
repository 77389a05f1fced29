r"""SAR: sharpness-aware and reliable entropy minimisation, with model recovery.

Niu, Wu, Zhang, Wen, Chen, Zhao, Tan, "Towards Stable Test-Time Adaptation in Dynamic Wild World",
ICLR 2023 (arXiv:2302.12400). Reference code: mr-eggplant/SAR (`sar.py`, `sam.py`, defaults from
`main.py`).

Per batch, with entropies ``H_i(theta)`` and ``E_0 = 0.4 ln C``:

1. ``S_1 = {i : H_i(theta) < E_0}``, ``L_1 = mean_{S_1} H_i(theta)`` (Eqn. 2);
2. SAM (Eqn. 4, `jaxpeft.optim.sam.sam_perturbation`): ``e = rho g / (||g||_2 + 1e-12)``, ``g = grad L_1``;
3. ``S_2 = {i in S_1 : H_i(theta + e) < E_0}``, ``L_2 = mean_{S_2} H_i(theta + e)``; the base optimizer
   steps from ``theta`` with ``grad L_2`` taken at ``theta + e``;
4. recovery: ``ema <- 0.9 ema + 0.1 L_2`` (``ema <- L_2`` first; skipped when ``S_2`` is empty); if
   ``ema < e_m = 0.2`` the adapted parameters and optimizer state go back to the source.

The returned logits are those of the first forward pass. Defaults (`main.py`): SGD(lr=0.00025,
momentum=0.9) as the base optimizer, ``rho = 0.05``, ``E_0 = 0.4 ln C``, ``e_m = 0.2``; the reference
adapts the norm layers except the last stage (`layer4` of ResNets, blocks 9-11 of ViT-B): set `pattern`
accordingly (the default adapts every norm affine).

Deviations: masks instead of index selection; an empty ``S_1`` gives a zero gradient (the reference's
NaN mean back-propagates zeros too). Faithfully to the reference, the moving average is *kept* after a
recovery (its `reset()` clears it, then `forward` writes the old value back).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from jaxpeft.optim.sam import sam_perturbation
from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  num_classes: int
  optimizer: optax.GradientTransformation = optax.sgd(0.00025, momentum=0.9)
  pattern: str = core.NORM_AFFINE
  rho: float = 0.05
  e_margin: float | None = None  # None: 0.4 * ln(num_classes)
  reset_constant: float = 0.2
  steps: int = 1

  @property
  def margin(self) -> float:
    return 0.4 * math.log(self.num_classes) if self.e_margin is None else self.e_margin


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  state = core.make_state(params, model_state, config, "sar")
  return state.replace(
      extra={
          "source": state.params,
          "ema": jnp.array(0.0),
          "has_ema": jnp.array(False),
          "num_resets": jnp.array(0),
      }
  )


def _one_step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config, extra = state.config, state.extra

  def entropy_of(params):
    logits = core.forward(config, core.join(params, state.fixed), state.model_state, images, batch_stats=True)
    return core.softmax_entropy(logits), logits

  def first_loss(params):
    entropy, logits = entropy_of(params)
    reliable = entropy < config.margin
    return core.masked_mean(entropy, reliable), (logits, reliable)

  (_, (logits, reliable)), grads = jax.value_and_grad(first_loss, has_aux=True)(state.params)
  perturbed = optax.apply_updates(state.params, sam_perturbation(grads, state.params, config.rho))

  def second_loss(params):
    entropy, _ = entropy_of(params)
    kept = reliable & (entropy < config.margin)
    return core.masked_mean(entropy, kept), kept

  (loss2, kept), grads2 = jax.value_and_grad(second_loss, has_aux=True)(perturbed)
  updates, opt_state = config.optimizer.update(grads2, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  valid = jnp.sum(kept) > 0
  ema = jnp.where(valid, jnp.where(extra["has_ema"], 0.9 * extra["ema"] + 0.1 * loss2, loss2), extra["ema"])
  has_ema = extra["has_ema"] | valid
  reset = has_ema & (ema < config.reset_constant)
  choose = lambda source, adapted: jax.tree.map(lambda a, b: jnp.where(reset, a, b), source, adapted)
  params = choose(extra["source"], params)
  opt_state = choose(config.optimizer.init(extra["source"]), opt_state)
  new_extra = dict(extra, ema=ema, has_ema=has_ema, num_resets=extra["num_resets"] + reset.astype(jnp.int32))
  return state.replace(params=params, opt_state=opt_state, extra=new_extra), logits


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  logits = None
  for _ in range(state.config.steps):
    state, logits = _one_step(state, images)
  return state, logits
