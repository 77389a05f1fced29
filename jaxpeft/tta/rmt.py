r"""RMT: robust mean teacher for continual and gradual test-time adaptation.

Döbler, Marsden, Yang, "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation", CVPR 2023
(arXiv:2211.13081). Reference code: mariodoebler/test-time-adaptation (`classification/methods/rmt.py`,
`utils/losses.py`, defaults from `conf.py` and `cfgs/cifar10_c/rmt.yaml`).

Student ``theta`` and EMA teacher ``theta'``, both normalising with batch statistics; features ``z = g(x)``
(the model's penultimate activations, sown as `intermediates/features`) and a projector
``h(z) = W_2 relu(W_1 z + b_1) + b_2`` trained with the student. Before adaptation (`prepare`):

* source prototypes ``c_k``: the mean of the source model's features over the clean source images of class
  ``k``;
* warm-up: ``T_w = warmup_samples // B`` steps on clean source batches ``x_s`` minimising
  ``mean_i SCE(f_theta(x_s)_i, f_{theta'}(x_s)_i)``, the learning rate rising linearly,
  ``lr_t = lr (t + 1) / T_w``, each step followed by the teacher update.

Per test batch ``x`` with an augmented copy ``x~`` (`cotta.augment`):

.. math::
   SCE(a, b) = -(1-\alpha) \sum_c \sigma(b)_c \log\sigma(a)_c - \alpha \sum_c \sigma(a)_c \log\sigma(b)_c,
   \qquad \alpha = 1/2

   L_{st} = \frac{1}{B} \sum_i \tfrac12 SCE(f_\theta(x)_i, f_{\theta'}(x)_i)
            + \tfrac12 SCE(f_\theta(x~)_i, f_{\theta'}(x)_i)

* contrastive term (SupCon with one positive group per test image, from SupContrast's `losses.py` as the
  reference integrates it): views ``v = [c_{k(i)}, z_i, z~_i]`` where ``k(i) = argmax_k cos(z_i, c_k)``;
  ``u = h(v) / ||h(v)||`` over all ``3B`` views, ``s_{ab} = u_a . u_b / tau``,

  .. math:: L_{cont} = -\frac{1}{3B} \sum_a \frac{1}{2} \sum_{b \in P(a)}
            \Big(s_{ab} - \log \sum_{b' \ne a} e^{s_{ab'}}\Big)

  with ``P(a)`` the two other views of ``a``'s image;
* source replay: ``L_{src} = CE(f_\theta(x_s), y_s)`` on the next clean labelled source batch;
* ``L = lambda_trg L_st + lambda_cont L_cont + lambda_src L_src``, one optimizer step on ``theta`` and the
  projector, then ``theta' <- m theta' + (1 - m) theta``.

The prediction is the ensemble ``f_theta(x) + f_{theta'}(x)`` (before the update). Defaults (CIFAR-10-C):
Adam(lr=1e-3, b1=0.9, b2=0.999), every parameter adapted (`pattern='.*'`), ``m = 0.999``, ``tau = 0.1``,
projection dimension 128, ``lambda_src = lambda_trg = lambda_cont = 1``, 50000 warm-up samples.

Deviations:
* The source data is the fixed set of clean labelled batches given to `prepare` (the reference reads the
  whole shuffled training set): prototypes average over it, warm-up and replay cycle through it in order,
  and the replay restarts at the same batch after a reset (the reference's loader runs on).
* The warm-up learning-rate ramp scales the optimizer's updates by ``(t + 1) / T_w``; this is the
  reference's learning-rate change for optimizers whose update is linear in the learning rate (SGD,
  Adam, AdamW).
* The projector has its own optimizer state, created at `init`: as in PyTorch, where the projector's Adam
  state starts at its first gradient (after the warm-up). It is initialised like Flax's `Dense` (LeCun
  normal kernel, zero bias; PyTorch's `Linear` draws uniform ones), from `seed`.
* The augmentation is `cotta.augment`, the grey-scale JAX version of the reference's CoTTA transforms.
* Batches of one image are refused (the reference buffers single images in a sliding window).
"""

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.tta import core
from jaxpeft.tta.cotta import augment


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  num_classes: int
  optimizer: optax.GradientTransformation = optax.adam(1e-3)
  pattern: str = ".*"
  mt: float = 0.999
  temperature: float = 0.1
  projection_dim: int = 128
  lambda_ce_src: float = 1.0
  lambda_ce_trg: float = 1.0
  lambda_cont: float = 1.0
  warmup_samples: int = 50000
  seed: int = 0


@flax.struct.dataclass
class Prepared:
  """What `prepare` derives from the clean source data, and `init` starts every run from."""

  student: core.PyTree  # the adapted leaves after the warm-up
  teacher: core.PyTree
  opt_state: optax.OptState
  prototypes: jax.Array  # (num_classes, feature dim)
  source_images: jax.Array  # (num batches, B, h, w, c): the replay buffer
  source_labels: jax.Array  # (num batches, B)
  first_replay: jax.Array  # the buffer index the replay starts at (where the warm-up stopped)


def symmetric_cross_entropy(logits: jax.Array, teacher_logits: jax.Array, alpha: float = 0.5) -> jax.Array:
  """``SCE(logits, teacher_logits)`` per row (module docstring)."""
  log_p, log_q = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(teacher_logits, -1)
  return -(1 - alpha) * jnp.sum(jnp.exp(log_q) * log_p, -1) - alpha * jnp.sum(jnp.exp(log_p) * log_q, -1)


def project(projector: core.PyTree, z: jax.Array) -> jax.Array:
  hidden = jax.nn.relu(z @ projector["dense1"]["kernel"] + projector["dense1"]["bias"])
  return hidden @ projector["dense2"]["kernel"] + projector["dense2"]["bias"]


def init_projector(key: jax.Array, features: int, dim: int) -> core.PyTree:
  k1, k2 = jax.random.split(key)
  lecun = jax.nn.initializers.lecun_normal()
  return {
      "dense1": {"kernel": lecun(k1, (features, dim)), "bias": jnp.zeros((dim,))},
      "dense2": {"kernel": lecun(k2, (dim, dim)), "bias": jnp.zeros((dim,))},
  }


def contrastive_loss(projector: core.PyTree, views: jax.Array, temperature: float) -> jax.Array:
  """``L_cont`` of `views` (B, V, D): the V views of an image are its positives (module docstring)."""
  b, v, _ = views.shape
  u = project(projector, jnp.swapaxes(views, 0, 1).reshape(v * b, -1))  # view-major, as torch.unbind/cat
  u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
  sim = u @ u.T / temperature
  sim = sim - jax.lax.stop_gradient(sim.max(1, keepdims=True))
  others = 1.0 - jnp.eye(v * b)
  positives = jnp.tile(jnp.eye(b), (v, v)) * others
  log_prob = sim - jnp.log(jnp.sum(jnp.exp(sim) * others, 1, keepdims=True))
  return -jnp.mean(jnp.sum(positives * log_prob, 1) / jnp.sum(positives, 1))


def _features(config: Config, params: core.PyTree, fixed: core.PyTree, model_state: core.PyTree, images):
  return core.forward_with_features(config, core.join(params, fixed), model_state, images, batch_stats=True)


def _teacher_update(mt: float, teacher: core.PyTree, student: core.PyTree) -> core.PyTree:
  return jax.tree.map(lambda t, s: mt * t + (1 - mt) * s, teacher, student)


def source_prototypes(
    params: core.PyTree, model_state: core.PyTree, config: Config, images: jax.Array, labels: jax.Array
) -> jax.Array:
  """``c_k``: mean source feature per class over the batches `images` (K, B, ...) with `labels` (K, B)."""
  run = jax.jit(lambda x: core.forward_with_features(config, params, model_state, x, batch_stats=True)[1])
  features = np.concatenate([np.asarray(run(x)) for x in images])
  labels = np.asarray(labels).reshape(-1)
  missing = sorted(set(range(config.num_classes)) - set(labels.tolist()))
  if missing:
    raise ValueError(
        f"rmt: the clean source images have no example of class(es) {missing}, so their prototypes are "
        "undefined; pass more clean images (config.clean_images) so every class appears."
    )
  return jnp.stack([features[labels == k].mean(0) for k in range(config.num_classes)])


def warm_up(
    params: core.PyTree, model_state: core.PyTree, config: Config, images: jax.Array
) -> tuple[core.PyTree, core.PyTree, optax.OptState]:
  """`(student, teacher, opt_state)` after the warm-up on the batches `images` (K, B, ...), cycled in order."""
  student, fixed = core.select(params, config.pattern, "rmt")
  teacher, opt_state = student, config.optimizer.init(student)
  steps = config.warmup_samples // images.shape[1]

  @jax.jit
  def one(student, teacher, opt_state, x, scale):
    teacher_logits = core.forward(config, core.join(teacher, fixed), model_state, x, batch_stats=True)
    loss = lambda p: symmetric_cross_entropy(
        core.forward(config, core.join(p, fixed), model_state, x, batch_stats=True), teacher_logits
    ).mean()
    updates, opt_state = config.optimizer.update(jax.grad(loss)(student), opt_state, student)
    student = optax.apply_updates(student, jax.tree.map(lambda u: scale * u, updates))
    return student, _teacher_update(config.mt, teacher, student), opt_state

  for t in range(steps):
    student, teacher, opt_state = one(student, teacher, opt_state, images[t % len(images)], (t + 1) / steps)
  return student, teacher, opt_state


def prepare(
    params: core.PyTree,
    model_state: core.PyTree,
    config: Config,
    clean_batches: Sequence[tuple[jax.Array, jax.Array]],
) -> dict[str, Prepared]:
  """`init`'s keyword arguments from clean labelled source batches `(images, labels)` of equal size."""
  if not clean_batches:
    raise ValueError(
        "rmt needs clean labelled source images (prototypes, warm-up, source replay); pass clean batches "
        "(launch/adapt.py: set config.clean_images > 0)."
    )
  images = jnp.stack([jnp.asarray(x) for x, _ in clean_batches])
  labels = jnp.stack([jnp.asarray(y, jnp.int32) for _, y in clean_batches])
  prototypes = source_prototypes(params, model_state, config, images, labels)
  student, teacher, opt_state = warm_up(params, model_state, config, images)
  first = (config.warmup_samples // images.shape[1]) % len(images)
  return {
      "prepared": Prepared(student, teacher, opt_state, prototypes, images, labels, jnp.array(first, jnp.int32))
  }


def init(params: core.PyTree, model_state: core.PyTree, config: Config, prepared: Prepared) -> core.TTAState:
  """The state after `prepare`'s warm-up (the reference's reset point), with a fresh projector."""
  core.check_batch_stats(model_state, "rmt")
  state = core.make_state(params, model_state, config, "rmt")
  key, projector_key = jax.random.split(jax.random.key(config.seed))
  projector = init_projector(projector_key, prepared.prototypes.shape[-1], config.projection_dim)
  return state.replace(
      params=prepared.student,
      opt_state=prepared.opt_state,
      extra={
          "teacher": prepared.teacher,
          "projector": projector,
          "projector_opt": config.optimizer.init(projector),
          "prototypes": prepared.prototypes,
          "source_images": prepared.source_images,
          "source_labels": prepared.source_labels,
          "replay": prepared.first_replay,
          "key": key,
      },
  )


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  core.check_batch(images, "rmt")
  config, extra = state.config, state.extra
  key, aug_key = jax.random.split(extra["key"])
  augmented = augment(aug_key, images)
  teacher_logits = jax.lax.stop_gradient(
      core.forward(config, core.join(extra["teacher"], state.fixed), state.model_state, images, batch_stats=True)
  )
  source_x, source_y = extra["source_images"][extra["replay"]], extra["source_labels"][extra["replay"]]
  prototypes = extra["prototypes"]

  def loss_fn(trainable):
    params, projector = trainable
    logits, z = _features(config, params, state.fixed, state.model_state, images)
    aug_logits, z_aug = _features(config, params, state.fixed, state.model_state, augmented)
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    nearest = jnp.argmax(jax.lax.stop_gradient(unit(z) @ unit(prototypes).T), -1)
    views = jnp.stack([prototypes[nearest], z, z_aug], 1)
    self_training = (
        0.5 * symmetric_cross_entropy(logits, teacher_logits)
        + 0.5 * symmetric_cross_entropy(aug_logits, teacher_logits)
    ).mean()
    loss = config.lambda_ce_trg * self_training + config.lambda_cont * contrastive_loss(
        projector, views, config.temperature
    )
    if config.lambda_ce_src > 0:
      source_logits = core.forward(
          config, core.join(params, state.fixed), state.model_state, source_x, batch_stats=True
      )
      loss += (
          config.lambda_ce_src * optax.softmax_cross_entropy_with_integer_labels(source_logits, source_y).mean()
      )
    return loss, logits

  (_, logits), (grads, projector_grads) = jax.value_and_grad(loss_fn, has_aux=True)(
      (state.params, extra["projector"])
  )
  updates, opt_state = config.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  projector_updates, projector_opt = config.optimizer.update(
      projector_grads, extra["projector_opt"], extra["projector"]
  )
  new_extra = dict(
      extra,
      teacher=_teacher_update(config.mt, extra["teacher"], params),
      projector=optax.apply_updates(extra["projector"], projector_updates),
      projector_opt=projector_opt,
      replay=(extra["replay"] + 1) % extra["source_images"].shape[0],
      key=key,
  )
  return state.replace(params=params, opt_state=opt_state, extra=new_extra), logits + teacher_logits
