r"""EATA / ETA: efficient anti-forgetting test-time adaptation.

Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan, "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022 (arXiv:2204.02610). Reference code: mr-eggplant/EATA (`eata.py`, defaults from `main.py`).

Per batch (BatchNorm with batch statistics), entropies ``H_i`` of ``p_i = softmax(f_theta(x_i))``:

* reliability: keep ``S_1 = {i : H_i < E_0}``, ``E_0 = 0.4 ln C`` (Eqn. 3);
* redundancy: with ``m`` the moving average of kept probabilities (None before the first), keep
  ``S_2 = {i in S_1 : |cos(m, p_i)| < eps_d}`` (Eqn. 5); then ``m <- 0.9 m + 0.1 mean_{S_2} p`` (the mean
  of ``S_1`` for the first one; unchanged when the set is empty) (Eqn. 4);
* loss (Eqns. 6, 8, 9): ``L = mean_{i in S_2} exp(E_0 - H_i) H_i + beta sum_k F_k (theta_k - theta^0_k)^2``,
  the weight ``exp(E_0 - H_i)`` held constant, ``F`` the diagonal Fisher of the source model
  (`fisher`), ``theta^0`` the parameters at `init`;
* the optimizer steps only when ``S_2`` is non-empty (no backward pass otherwise).

ETA is EATA without the Fisher term (`fishers=None` in `init`; `fisher_alpha=0` makes `prepare` skip
it). The state's `extra` counts
`num_reliable` (``|S_1|`` summed), `num_backward` (``|S_2|`` summed: the images back-propagated) and
`num_updates` (batches with a backward pass). Defaults (`main.py`, ImageNet-C): SGD(lr=0.00025,
momentum=0.9), ``eps_d = 0.05``, ``beta = 2000``, ``E_0 = 0.4 ln C``; the Fisher from 2000 clean
images with the model's own predictions as labels.

Deviations: masks instead of index selection (same values); the reference's empty-selection loss is
NaN but never back-propagated, here it is 0 and not applied.
"""

import dataclasses
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import optax

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  num_classes: int
  optimizer: optax.GradientTransformation = optax.sgd(0.00025, momentum=0.9)
  pattern: str = core.NORM_AFFINE
  e_margin: float | None = None  # None: 0.4 * ln(num_classes)
  d_margin: float = 0.05
  fisher_alpha: float = 2000.0
  steps: int = 1

  @property
  def margin(self) -> float:
    return 0.4 * math.log(self.num_classes) if self.e_margin is None else self.e_margin


def fisher(
    params: core.PyTree, model_state: core.PyTree, config: Config, batches: Iterable[jax.Array]
) -> core.PyTree:
  """Diagonal Fisher of the adapted leaves: mean over batches of (grad of CE to the argmax labels)^2.

  As the reference's `main.py`: batch statistics, cross-entropy against the model's own predictions,
  squared gradients of each batch's mean loss, averaged over the batches.
  """
  adapted, fixed = core.select(params, config.pattern, "eata")

  @jax.jit
  def squared_grad(p, images):
    def loss(p):
      logits = core.forward(config, core.join(p, fixed), model_state, images, batch_stats=True)
      labels = jax.lax.stop_gradient(jnp.argmax(logits, -1))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.tree.map(jnp.square, jax.grad(loss)(p))

  total, count = None, 0
  for images in batches:
    g = squared_grad(adapted, images)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    count += 1
  if not count:
    raise ValueError("eata.fisher needs at least one batch of clean (source) images.")
  return jax.tree.map(lambda x: x / count, total)


def prepare(
    params: core.PyTree,
    model_state: core.PyTree,
    config: Config,
    clean_batches: Iterable[jax.Array],
    clean_labels: Iterable[jax.Array] = (),
) -> dict[str, core.PyTree]:
  """`init`'s keyword arguments from clean source images: the Fisher (none when `fisher_alpha` is 0: ETA).

  The labels are not used: the Fisher takes the model's own predictions as labels (as the reference).
  """
  del clean_labels
  if not config.fisher_alpha:
    return {}
  return {"fishers": fisher(params, model_state, config, clean_batches)}


def init(
    params: core.PyTree, model_state: core.PyTree, config: Config, fishers: core.PyTree | None = None
) -> core.TTAState:
  """EATA with `fishers` (from `fisher`), ETA without."""
  state = core.make_state(params, model_state, config, "eata")
  extra = {
      "probs": jnp.zeros((config.num_classes,), jnp.float32),
      "has_probs": jnp.array(False),
      "num_reliable": jnp.array(0),
      "num_backward": jnp.array(0),
      "num_updates": jnp.array(0),
  }
  if fishers is not None:
    extra["fisher"] = fishers
    extra["anchor"] = state.params
  return state.replace(extra=extra)


def _one_step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config, extra = state.config, state.extra

  def loss_fn(params):
    logits = core.forward(config, core.join(params, state.fixed), state.model_state, images, batch_stats=True)
    entropy = core.softmax_entropy(logits)
    probs = jax.nn.softmax(logits, -1)
    reliable = entropy < config.margin
    norms = jnp.linalg.norm(probs, axis=-1) * jnp.linalg.norm(extra["probs"])
    cosine = probs @ extra["probs"] / jnp.maximum(norms, 1e-8)
    kept = reliable & jnp.where(extra["has_probs"], jnp.abs(cosine) < config.d_margin, True)
    weight = jax.lax.stop_gradient(jnp.exp(config.margin - entropy))
    loss = core.masked_mean(weight * entropy, kept)
    if "fisher" in extra:
      loss += config.fisher_alpha * sum(
          jnp.sum(f * (p - a) ** 2)
          for f, p, a in zip(*map(jax.tree.leaves, (extra["fisher"], params, extra["anchor"])))
      )
    return loss, (logits, probs, reliable, kept)

  (_, (logits, probs, reliable, kept)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  count = jnp.sum(kept)
  updates, opt_state = config.optimizer.update(grads, state.opt_state, state.params)
  update = count > 0
  choose = lambda new, old: jax.tree.map(lambda a, b: jnp.where(update, a, b), new, old)
  kept_mean = jnp.sum(jnp.where(kept[:, None], probs, 0.0), 0) / jnp.maximum(count, 1)
  probs_avg = jnp.where(extra["has_probs"], 0.9 * extra["probs"] + 0.1 * kept_mean, kept_mean)
  new_extra = dict(
      extra,
      probs=jnp.where(update, probs_avg, extra["probs"]),
      has_probs=extra["has_probs"] | update,
      num_reliable=extra["num_reliable"] + jnp.sum(reliable),
      num_backward=extra["num_backward"] + count,
      num_updates=extra["num_updates"] + update.astype(jnp.int32),
  )
  return (
      state.replace(
          params=choose(optax.apply_updates(state.params, updates), state.params),
          opt_state=choose(opt_state, state.opt_state),
          extra=new_extra,
      ),
      logits,
  )


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  logits = None
  for _ in range(state.config.steps):
    state, logits = _one_step(state, images)
  return state, logits
