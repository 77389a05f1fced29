"""What the test-time adaptation methods share: the state, the parameter selection, the forward pass.

A method's state is a `TTAState`: the adapted leaves (`params`, chosen by a regex over '/'-joined
parameter paths, norm affine parameters by default), the other leaves (`fixed`), the model's
collections (`model_state`: BatchNorm's source `batch_stats`), the optimizer state, the method's own
arrays (`extra`) and its config, a static (hashable) field, so `jax.jit(method.step)` works on the
state alone. Configs hold the model's `apply_fn` (a Flax `Module.apply` taking `train=`).

BatchNorm at test time: `train=True` normalises with the test batch's statistics, as the reference
implementations do (`track_running_stats=False`); the running averages are never updated (the
references drop them).
"""

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

PyTree = Any
ApplyFn = Callable[..., Any]

# Scale and bias of normalisation layers: BatchNorm ('bn', 'BatchNorm_0'), LayerNorm ('ln_*', 'norm'),
# GroupNorm ('gn', 'GroupNorm_0').
NORM_AFFINE = r"(?i)(.*/)?[^/]*(bn|norm|ln|gn)[^/]*/(scale|bias)"


@flax.struct.dataclass
class TTAState:
  """The state of one adaptation run (see the module docstring)."""

  params: PyTree
  fixed: PyTree
  model_state: PyTree
  opt_state: optax.OptState
  extra: dict[str, jax.Array]
  config: Any = flax.struct.field(pytree_node=False)


def select(params: PyTree, pattern: str, method: str) -> tuple[PyTree, PyTree]:
  """`(adapted, fixed)`: the leaves whose path fully matches `pattern`, and the rest."""
  flat = traverse_util.flatten_dict(params, sep="/")
  regex = re.compile(pattern)
  chosen = {k: v for k, v in flat.items() if regex.fullmatch(k)}
  if not chosen:
    paths = ", ".join(list(flat)[:16]) + (", ..." if len(flat) > 16 else "")
    raise ValueError(
        f"{method}: the parameter pattern {pattern!r} matches no parameter of this model (it has: "
        f"{paths}). {method} adapts normalisation layers by default; use a model with norm layers "
        "or set `pattern` to the leaves to adapt."
    )
  rest = {k: v for k, v in flat.items() if k not in chosen}
  return traverse_util.unflatten_dict(chosen, sep="/"), traverse_util.unflatten_dict(rest, sep="/")


def join(adapted: PyTree, fixed: PyTree) -> PyTree:
  """The full parameter tree from `select`'s two halves."""
  return traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(fixed, sep="/"), **traverse_util.flatten_dict(adapted, sep="/")}, sep="/"
  )


def check_batch_stats(model_state: PyTree, method: str) -> None:
  if not model_state or "batch_stats" not in model_state:
    raise ValueError(
        f"{method} normalises with test-batch statistics, but the model state has no 'batch_stats' "
        f"(got collections {sorted(model_state or {})}). Use a model with BatchNorm and pass the "
        "checkpoint's batch statistics (launch/train.py exports them in export/model_state)."
    )


def check_batch(images: jax.Array, method: str, minimum: int = 2) -> None:
  if images.shape[0] < minimum:
    raise ValueError(
        f"{method} estimates normalisation statistics from the test batch, which needs at least "
        f"{minimum} images; got a batch of {images.shape[0]}. Use a larger batch_size, or a method"
        " made for single images (e.g. source, or sar with a norm that needs no batch)."
    )


def forward(
    config: Any, params: PyTree, model_state: PyTree, images: jax.Array, *, batch_stats: bool
) -> jax.Array:
  """Logits of the model; with `batch_stats` BatchNorm normalises by the test batch (running stats untouched)."""
  variables = {"params": params, **(model_state or {})}
  if batch_stats and model_state and "batch_stats" in model_state:
    logits, _ = config.apply_fn(variables, images, train=True, mutable=["batch_stats"])
    return logits
  return config.apply_fn(variables, images, train=batch_stats)


def forward_with_features(
    config: Any, params: PyTree, model_state: PyTree, images: jax.Array, *, batch_stats: bool
) -> tuple[jax.Array, jax.Array]:
  """`(logits, features)`: the model must sow its penultimate features as `intermediates/features`."""
  variables = {"params": params, **(model_state or {})}
  mutable = ["intermediates"] + (["batch_stats"] if batch_stats and "batch_stats" in (model_state or {}) else [])
  logits, collections = config.apply_fn(variables, images, train=batch_stats, mutable=mutable)
  sown = collections.get("intermediates", {}).get("features")
  if sown is None:
    raise ValueError(
        "This method needs the model's features: the model must call "
        "self.sow('intermediates', 'features', x) on its penultimate activations (as "
        "jaxpeft.models.resnet.ResNet does)."
    )
  return logits, sown[0]


def softmax_entropy(logits: jax.Array) -> jax.Array:
  """Entropy `-sum_c p_c log p_c` of each row's softmax."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` where `mask`; 0 (with zero gradient) where nothing is selected."""
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def make_state(
    params: PyTree, model_state: PyTree, config: Any, method: str, extra: dict[str, jax.Array] | None = None
) -> TTAState:
  """A fresh state with `config.pattern`'s leaves adapted by `config.optimizer`."""
  adapted, fixed = select(params, config.pattern, method)
  return TTAState(
      params=adapted,
      fixed=fixed,
      model_state=model_state or {},
      opt_state=config.optimizer.init(adapted),
      extra=extra or {},
      config=config,
  )


# `normalizer(path, x, source_mean, source_var) -> (mean, var)`: the statistics a BatchNorm layer (named by
# its '/'-joined module path) normalises its input `x` with, each broadcastable to `x`.
Normalizer = Callable[[str, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance of `x` over every axis but the last (channels), as BatchNorm computes them."""
  axes = tuple(range(x.ndim - 1))
  return jnp.mean(x, axes), jnp.var(x, axes)


def forward_with_normalizer(
    config: Any, params: PyTree, model_state: PyTree, images: jax.Array, normalizer: Normalizer
) -> tuple[jax.Array, jax.Array | None]:
  """`(logits, features or None)` with every `nn.BatchNorm` normalising by `normalizer`'s statistics.

  Each BatchNorm call is intercepted (`flax.linen.intercept_methods`) and replaced by
  ``(x - mean) / sqrt(var + eps) * scale + bias`` with the layer's own `eps`, scale and bias, `mean, var`
  from `normalizer` (given the layer's source running averages); the running averages are not changed.
  Features are those the model sows as `intermediates/features` (None when it sows none).
  """
  check_batch_stats(model_state, "a test-time normalisation method")

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if module.axis not in (-1, args[0].ndim - 1):
      raise ValueError(
          f"{'/'.join(module.path)}: test-time normalisation supports BatchNorm over the last axis only."
      )
    x, stats = args[0], module.variables["batch_stats"]
    mean, var = normalizer("/".join(module.path), x, stats["mean"], stats["var"])
    y = (x - mean) * jax.lax.rsqrt(var + module.epsilon)
    if module.use_scale:
      y = y * module.get_variable("params", "scale")
    if module.use_bias:
      y = y + module.get_variable("params", "bias")
    return y.astype(x.dtype)

  variables = {"params": params, **model_state}
  with nn.intercept_methods(interceptor):
    logits, collections = config.apply_fn(variables, images, train=False, mutable=["intermediates"])
  sown = collections.get("intermediates", {}).get("features")
  return logits, None if sown is None else sown[0]


def descend(state: TTAState, loss_fn: Callable[[PyTree], tuple[jax.Array, Any]]) -> tuple[TTAState, Any]:
  """One step of `state.config.optimizer` on `loss_fn(params) -> (loss, aux)`; returns `(state, aux)`."""
  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.config.optimizer.update(grads, state.opt_state, state.params)
  return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), aux


def clean_features(
    params: PyTree,
    model_state: PyTree,
    config: Any,
    clean_batches: list[tuple[jax.Array, Any]],
    method: str,
) -> tuple[np.ndarray, np.ndarray]:
  """`(features, labels)` of clean batches `(images, labels)`: the source model's sown features (running stats)."""
  if not clean_batches:
    raise ValueError(
        f"{method} needs labelled clean (source) images: pass clean batches with their labels "
        "(launch/adapt.py: set config.clean_images > 0)."
    )
  features = jax.jit(lambda x: forward_with_features(config, params, model_state, x, batch_stats=False)[1])
  return (
      np.concatenate([np.asarray(features(x), np.float64) for x, _ in clean_batches]),
      np.concatenate([np.asarray(y) for _, y in clean_batches]),
  )
