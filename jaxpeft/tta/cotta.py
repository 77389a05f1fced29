r"""CoTTA: continual test-time adaptation with a mean teacher, augmentation and stochastic restore.

Wang, Fink, Van Gool, Dai, "Continual Test-Time Domain Adaptation", CVPR 2022 (arXiv:2203.13591).
Reference code: qinenergy/cotta (`cifar/cotta.py`, defaults from `cifar/cfgs/cifar10/cotta.yaml`).

Student ``theta``, teacher ``theta'`` (EMA) and the frozen source ``theta_0``, all normalising with batch
statistics. Per batch ``x``:

1. teacher prediction: if the source's mean top-1 confidence ``mean_i max softmax(f_{theta_0}(x))_i`` is
   below ``p_th`` (`ap`), ``y' = (1/N) sum_n f_{theta'}(aug_n(x))`` over ``N = 32`` random augmentations,
   else ``y' = f_{theta'}(x)`` (Eqn. 5);
2. student: ``L = -(1/B) sum_i sum_c softmax(y')_ic log softmax(f_theta(x))_ic`` and one optimizer step;
3. teacher: ``theta' <- alpha theta' + (1 - alpha) theta`` (``alpha`` = `mt`);
4. stochastic restore: every scalar of ``theta`` goes back to ``theta_0`` with probability `rst`
   (masks from `restore_masks`).

The method predicts with the teacher's ``y'``. Defaults (CIFAR-10-C config): Adam(lr=1e-3), every
parameter adapted (`pattern='.*'`), ``mt = 0.999``, ``rst = 0.01``, ``ap = 0.92``, ``N = 32``.

Deviations: the augmentations (`augment`) are a grey-scale JAX version of the reference's
`get_tta_transforms`: brightness/contrast/gamma jitter (0.6-1.4, 0.7-1.3, 0.7-1.3), a random affine
(rotation +-15 deg, translation +-1/16, scale 0.9-1.1, edge padding, bilinear), a horizontal flip with
p = 0.5, Gaussian noise (std 0.005) and clipping to [0, 1]; the reference's saturation/hue jitter (no
colour here) and its small Gaussian blur are left out. Random draws come from JAX keys in the state.
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
  pattern: str = ".*"
  mt: float = 0.999
  rst: float = 0.01
  ap: float = 0.92
  num_augmentations: int = 32
  seed: int = 0


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  state = core.make_state(params, model_state, config, "cotta")
  return state.replace(extra={"teacher": state.params, "source": state.params, "key": jax.random.key(config.seed)})


def restore_masks(key: jax.Array, params: core.PyTree, rst: float) -> core.PyTree:
  """One Bernoulli(`rst`) mask per leaf of `params` (True: restore that scalar to the source)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [jax.random.uniform(k, x.shape) < rst for k, x in zip(keys, leaves)])


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """One random augmentation of each image of a batch (b, h, w, c) in [0, 1] (see the module docstring)."""

  def one(key, image):
    k = jax.random.split(key, 9)
    image = jnp.clip(image * jax.random.uniform(k[0], (), minval=0.6, maxval=1.4), 0, 1)
    mean = image.mean()
    image = jnp.clip((image - mean) * jax.random.uniform(k[1], (), minval=0.7, maxval=1.3) + mean, 0, 1)
    image = image ** jax.random.uniform(k[2], (), minval=0.7, maxval=1.3)
    h, w = image.shape[:2]
    angle = jnp.deg2rad(jax.random.uniform(k[3], (), minval=-15, maxval=15))
    scale = jax.random.uniform(k[4], (), minval=0.9, maxval=1.1)
    shift = jax.random.uniform(k[5], (2,), minval=-1 / 16, maxval=1 / 16) * jnp.array([h, w])
    rows, cols = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij")
    rows, cols = rows - shift[0], cols - shift[1]
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    src_r = cos * rows - sin * cols + (h - 1) / 2
    src_c = sin * rows + cos * cols + (w - 1) / 2
    image = jnp.stack(
        [
            jax.scipy.ndimage.map_coordinates(image[..., c], [src_r, src_c], order=1, mode="nearest")
            for c in range(image.shape[-1])
        ],
        -1,
    )
    image = jnp.where(jax.random.bernoulli(k[6]), image[:, ::-1], image)
    return jnp.clip(image + 0.005 * jax.random.normal(k[7], image.shape), 0, 1)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config, extra = state.config, state.extra
  key, aug_key, restore_key = jax.random.split(extra["key"], 3)
  run = lambda p, x: core.forward(config, core.join(p, state.fixed), state.model_state, x, batch_stats=True)
  anchor_confidence = jnp.max(jax.nn.softmax(run(extra["source"], images), -1), -1).mean()
  standard = run(extra["teacher"], images)

  def averaged():
    keys = jax.random.split(aug_key, config.num_augmentations)
    return jax.lax.map(lambda k: run(extra["teacher"], augment(k, images)), keys).mean(0)

  teacher_logits = jax.lax.stop_gradient(jax.lax.cond(anchor_confidence < config.ap, averaged, lambda: standard))

  def loss_fn(params):
    log_p = jax.nn.log_softmax(run(params, images), -1)
    return -jnp.sum(jax.nn.softmax(teacher_logits, -1) * log_p, -1).mean()

  grads = jax.grad(loss_fn)(state.params)
  updates, opt_state = config.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  teacher = jax.tree.map(lambda t, p: config.mt * t + (1 - config.mt) * p, extra["teacher"], params)
  masks = restore_masks(restore_key, params, config.rst)
  params = jax.tree.map(lambda m, s, p: jnp.where(m, s, p), masks, extra["source"], params)
  new_extra = dict(extra, teacher=teacher, key=key)
  return state.replace(params=params, opt_state=opt_state, extra=new_extra), teacher_logits
