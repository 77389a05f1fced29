r"""SAM: Sharpness-Aware Minimization, with ASAM's adaptive (scale-invariant) neighbourhood.

Papers:
  * P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for Efficiently
    Improving Generalization", ICLR 2021, arXiv:2010.01412.
  * J. Kwon, J. Kim, H. Park, I. K. Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", ICML 2021, arXiv:2102.11600.

SAM minimises ``max_{||e|| <= rho} L(w + e)``. The inner maximum is solved to first order, and
the gradient at the perturbed point is handed to a base optimizer (Algorithm 1 of Foret et al.):

.. math::

  g = \nabla L(w), \qquad
  e(w) = \rho \, \frac{T_w^2 \, g}{\lVert T_w \, g \rVert_2 + \epsilon}, \qquad
  g_{\mathrm{SAM}} = \nabla L(w + e(w)), \qquad
  w \leftarrow w + \mathrm{base}(g_{\mathrm{SAM}})

where ``T_w = 1`` for SAM and ``T_w = diag(|w| + eta)`` for ASAM (``adaptive=True``). The norm is
global, over every leaf of the parameter tree.

Defaults and references:
  * ``rho=0.05``, ``eps=1e-12`` (added to the norm), ``eta=0.0``: as ``pytorch_optimizer.SAM``
    (which follows the widely used davda54/sam code; it has no ``eta``, i.e. ``eta=0``). The
    base optimizer defaults to plain SGD with ``learning_rate``, the update rule of Algorithm 1 in
    Foret et al. (``pytorch_optimizer.SAM`` requires a base optimizer class; any optax
    transformation can be given as ``base_optimizer``).
  * ASAM works with larger radii than SAM: its code (SamsungLabs/ASAM) defaults to ``rho=0.5``
    and davda54/sam recommends ``rho=2.0`` for its adaptive mode; pass it explicitly.
  * ``pytorch_optimizer.SAM`` accumulates the global norm in float32 even for float64 params
    (``get_global_gradient_norm`` casts with ``.float()``): its perturbation carries ~1e-7
    relative rounding error, and for gradient norms above ~1.8e19 the squared norm overflows to
    inf and its perturbation silently becomes zero. Ours accumulates in the wider of float32 and
    the gradient's dtype; the tests compare with it at an absolute slack of 1e-8 and use
    float64 transcriptions of the formulas for the huge-gradient case.
  * ASAM's official code uses ``T_w = |w| + eta`` only for parameters whose name contains
    'weight' and ``T_w = 1`` for the others (biases), adds ``1e-16`` to the norm, and its
    ``ASAM`` class defaults to ``eta=0.01`` (its CIFAR script to ``eta=0.0``). Here ``T_w`` is
    applied to every leaf; to exclude biases wrap the transformation with ``optax.masked`` or
    keep them out of the optimized tree. ``eps`` can be set to ``1e-16`` to match that code.

Opaque mode: ``update(grads, state, params, grad_fn=grad_fn)`` performs the whole SAM step in one
call; ``grad_fn(perturbed_params) -> grads`` must return the gradient of the loss on the same
batch as ``grads``. The returned updates are the base optimizer's updates for the SAM gradient.

Differences from ``optax.contrib.sam``: optax wraps an outer and an "adversarial" optimizer and
alternates between them every ``sync_period`` calls (transparent mode) or loops inside one call
(``opaque_mode=True``, ``grad_fn(params, i)`` with an adversarial step index). Its normaliser
divides by the plain norm without ``eps`` (a zero gradient gives NaN), and it has no adaptive
(ASAM) mode. ``opaque_mode=True, sync_period=2`` with ``adv_optimizer=chain(normalize(),
sgd(rho))`` equals ``sam(..., adaptive=False)`` here up to ``eps``; the test suite checks this.
Ours is a single-perturbation transformation with SAM's and ASAM's hyperparameters, ``eps``, and
a one-argument ``grad_fn``.

Multiple devices: with ``axis_name`` (the data-parallel batch axis of ``pmap`` / ``shard_map``),
both the incoming gradient and ``grad_fn``'s gradient are averaged over that axis with
``jax.lax.pmean``, so the perturbation (and its global norm) comes from the full-batch gradient
and every device takes the same step: the result equals the single-device result on the whole
batch (for a loss that is a mean over equal-sized shards). Averaging already-averaged gradients
changes nothing. With ``axis_name=None`` and per-device gradients each device perturbs with its
own gradient, which is the paper's "m-sharpness" with m = per-device batch size.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

GradFn = Callable[[optax.Params], optax.Updates]


def sam_perturbation(
    grads: optax.Updates,
    params: optax.Params,
    radius: jax.typing.ArrayLike,
    *,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-12,
) -> optax.Updates:
  """The perturbation ``e = radius * T^2 g / (||T g|| + eps)``; ``T = |w| + eta`` if adaptive, else 1.

  The global norm is accumulated in at least float32; each leaf of ``e`` has its parameter's dtype.
  """
  if adaptive:
    scales = jax.tree.map(lambda p: jnp.abs(p) + eta, params)
    scaled_grads = jax.tree.map(jnp.multiply, scales, grads)
    directions = jax.tree.map(jnp.multiply, scales, scaled_grads)
  else:
    scaled_grads = directions = grads
  norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), scaled_grads))
  factor = radius / (norm + eps)
  return jax.tree.map(lambda d, p: (factor * d).astype(p.dtype), directions, params)


def sharpness_aware_gradient(
    grads: optax.Updates,
    params: optax.Params,
    grad_fn: GradFn,
    radius: jax.typing.ArrayLike,
    *,
    adaptive: bool,
    eta: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    axis_name: str | None,
) -> optax.Updates:
  """``grad_fn(w + e(w))`` with ``e`` from `sam_perturbation`; gradients averaged over ``axis_name``."""

  def mean_over_devices(tree):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

  perturbation = sam_perturbation(mean_over_devices(grads), params, radius, adaptive=adaptive, eta=eta, eps=eps)
  return mean_over_devices(grad_fn(optax.apply_updates(params, perturbation)))


def check_opaque_args(name: str, params: optax.Params | None, grad_fn: GradFn | None) -> None:
  """Raises a ValueError naming what `update` of a SAM-style transformation is missing."""
  if params is None:
    raise ValueError(f"{name}: `update` needs the current `params` to build the perturbed point.")
  if grad_fn is None:
    raise ValueError(
        f"{name}: `update` needs `grad_fn=`, a function params -> gradient of the loss on the "
        "current batch, e.g. `tx.update(grads, state, params, grad_fn=jax.grad(loss_on_batch))`."
    )


def scale_by_sam(
    rho: jax.typing.ArrayLike = 0.05,
    *,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Replaces the gradient by the SAM gradient ``grad_fn(w + e(w))`` (see module docstring).

  Args:
    rho: radius of the neighbourhood (SAM: 0.05; ASAM is used with ~0.5-2.0).
    adaptive: ASAM's scale-invariant neighbourhood, ``T_w = |w| + eta``.
    eta: ASAM's offset keeping ``T_w`` positive for zero weights (only used if ``adaptive``).
    eps: added to the gradient norm to avoid dividing by zero.
    axis_name: data-parallel axis over which gradients are averaged (``jax.lax.pmean``).

  Returns:
    A transformation whose ``update(grads, state, params, *, grad_fn)`` returns SAM gradients.
  """

  def init_fn(params: optax.Params) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(
      updates: optax.Updates,
      state: optax.EmptyState,
      params: optax.Params | None = None,
      *,
      grad_fn: GradFn | None = None,
      **extra_args,
  ) -> tuple[optax.Updates, optax.EmptyState]:
    del extra_args
    check_opaque_args("scale_by_sam", params, grad_fn)
    sam_grads = sharpness_aware_gradient(
        updates, params, grad_fn, rho, adaptive=adaptive, eta=eta, eps=eps, axis_name=axis_name
    )
    return sam_grads, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def base_optimizer_or_sgd(
    name: str,
    learning_rate: optax.ScalarOrSchedule | None,
    base_optimizer: optax.GradientTransformation | None,
) -> optax.GradientTransformation:
  """``base_optimizer`` if given (then ``learning_rate`` must be None), else ``optax.sgd(learning_rate)``."""
  if base_optimizer is None:
    if learning_rate is None:
      raise ValueError(f"{name}: give a `learning_rate` (for the default SGD) or a `base_optimizer`.")
    return optax.sgd(learning_rate)
  if learning_rate is not None:
    raise ValueError(
        f"{name}: `learning_rate` is only used by the default SGD; with a `base_optimizer`, set its "
        "own learning rate, e.g. `base_optimizer=optax.adamw(1e-4)`, and leave `learning_rate=None`."
    )
  return base_optimizer


def sam(
    learning_rate: optax.ScalarOrSchedule | None = None,
    rho: jax.typing.ArrayLike = 0.05,
    *,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-12,
    base_optimizer: optax.GradientTransformation | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SAM / ASAM in opaque mode: ``chain(scale_by_sam(...), base_optimizer)``.

  Example::

    tx = sam(learning_rate=0.1, rho=0.05)                       # SAM with SGD
    tx = sam(rho=0.5, adaptive=True, base_optimizer=optax.adamw(1e-4))  # ASAM with AdamW
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))

  Args:
    learning_rate: learning rate (float or schedule) of the default SGD base optimizer; None when
      ``base_optimizer`` is given.
    rho: neighbourhood radius.
    adaptive: ASAM (``T_w = |w| + eta``).
    eta: ASAM's offset.
    eps: added to the gradient norm.
    base_optimizer: optimizer applied to the SAM gradient (default: ``optax.sgd(learning_rate)``).
    axis_name: data-parallel axis name for ``pmap`` / ``shard_map``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` and ``grad_fn=``.
  """
  base = base_optimizer_or_sgd("sam", learning_rate, base_optimizer)
  return optax.chain(scale_by_sam(rho, adaptive=adaptive, eta=eta, eps=eps, axis_name=axis_name), base)
