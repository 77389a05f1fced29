r"""AdaHessian: Adam with the gradient's second moment replaced by a Hutchinson Hessian diagonal.

Paper: "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning", Zhewei Yao, Amir
Gholami, Sheng Shen, Mustafa Mustafa, Kurt Keutzer and Michael W. Mahoney, AAAI 2021,
arXiv:2006.00719.

With objective :math:`f`, a Rademacher vector :math:`z` (entries :math:`\pm 1`, drawn from a PRNG
key kept in the state) and the Hessian-vector product :math:`Hz` (forward-over-reverse,
``jax.jvp`` of ``jax.grad(obj_fn)``), Hutchinson's estimator of the Hessian diagonal is
:math:`\mathbb{E}[z \odot Hz] = \operatorname{diag}(H)`. For a conv kernel, the estimate is
replaced by the mean of :math:`|z \odot Hz|` over the kernel's spatial axes (the paper's
"spatial averaging"). Then, with learning rate :math:`\eta_t`, Hessian power :math:`k` and
decoupled weight decay :math:`\lambda`:

.. math::

  m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
  v_t  = \beta_2 v_{t-1} + (1-\beta_2) D_t^2 \\
  \theta_t &= \theta_{t-1} - \eta_t\Big(\frac{m_t / (1-\beta_1^t)}
       {\big(v_t / (1-\beta_2^t)\big)^{k/2} + \epsilon} + \lambda\theta_{t-1}\Big)

Reference followed: the authors' code (github.com/amirgholami/adahessian,
``image_classification/optim_adahessian.py``; defaults ``lr=0.15, betas=(0.9, 0.999), eps=1e-4,
weight_decay=0, hessian_power=1``), whose ``p - lr * (m_hat / denom + weight_decay * p)`` is
``optax.add_decayed_weights`` followed by ``optax.scale_by_learning_rate``. Its spatial averaging
takes PyTorch OIHW conv kernels' dims ``[2, 3]`` (H, W); Flax kernels are HWIO, so here
``conv_spatial_axes=(0, 1)`` is the default, applied to every 4-D leaf (pass ``(2, 3)`` for
OIHW-laid-out weights, ``None`` to switch it off). Leaves of other ranks are not averaged, as in
the authors' code (their 2-D "block" averaging of the transformer code is not offered).

``update_each`` (:math:`k` steps between Hessian estimates, to save compute): as
``pytorch_optimizer.AdaHessian``'s ``update_period``, the estimate is drawn on steps
:math:`1, 1+k, 1+2k, \dots` and :math:`v_t` is updated only on those steps, while both bias
corrections use the full step count. (davda54/ada-hessian instead re-adds the stale estimate to
:math:`v_t` on every step; the authors' code has no such option.)

Known differences between references, all tested: ``pytorch_optimizer.AdaHessian`` (4.1) uses
``lr=0.1, eps=1e-16`` and no spatial averaging; given the same Hessian diagonal (its
``step(hessian=...)``) it matches this module with ``conv_spatial_axes=None`` exactly, and the
authors' averaging is that update fed the averaged estimate. Optax has no AdaHessian.

Usage: ``tx.update(grads, state, params, obj_fn=loss_of_params)``, where ``obj_fn(params)`` is the
scalar objective (same batch as ``grads``); the Hessian-vector product is evaluated at ``params``.

Sharding (``axis_name``): for data parallelism under pmap / shard_map, name the batch axis; each
device's Hessian-diagonal estimate (from its own ``obj_fn``) is ``pmean``-ed over it, as the
authors' distributed code intends, so every device applies the same preconditioner. The PRNG key
is part of the (replicated) state, so all devices draw the same :math:`z`. Gradients are expected
already averaged, as usual.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, Interval, check_hyperparameters

ObjectiveFn = Callable[[optax.Params], jax.Array]
_HESSIAN_POWER = Interval(0.0, 1.0, low_open=True, high_open=False)  # (0, 1]


class ScaleByAdaHessianState(NamedTuple):
  """State of `scale_by_adahessian`."""

  count: jax.Array  # shape=(), int32: number of steps taken.
  key: jax.Array  # PRNG key for the next Rademacher draw.
  mu: optax.Updates  # m_t, averaged gradients.
  nu: optax.Updates  # v_t, averaged squared Hessian-diagonal estimates.


def hutchinson_hessian_diagonal(obj_fn: ObjectiveFn, params: optax.Params, key: jax.Array) -> optax.Params:
  """One-sample Hutchinson estimate z * (H z) of diag(Hessian of `obj_fn` at `params`).

  `z` has independent Rademacher (+-1) entries drawn from `key`, one subkey per leaf; `H z` is the
  forward-over-reverse Hessian-vector product. Unbiased; exact when the Hessian is diagonal.
  """
  z = optax.tree.random_like(key, params, sampler=jax.random.rademacher)
  _, hz = jax.jvp(jax.grad(obj_fn), (params,), (z,))
  return jax.tree.map(jnp.multiply, z, hz)


def _as_prng_key(key: jax.Array | int) -> jax.Array:
  """An integer seed becomes `jax.random.PRNGKey(seed)`; a key (raw uint32[2] or typed) is kept."""
  key = jnp.asarray(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or key.ndim == 1:
    return key
  if not jnp.issubdtype(key.dtype, jnp.integer) or key.ndim != 0:
    raise ValueError(f"adahessian: key must be an integer seed or a jax.random key, got {key!r}.")
  return jax.random.PRNGKey(key)


def _spatial_average(diagonal: optax.Params, axes: Sequence[int] | None) -> optax.Params:
  """Mean of |D| over `axes` of every 4-D (conv-kernel) leaf, broadcast back; other leaves as is."""
  if axes is None:
    return diagonal
  axes = tuple(axes)

  def average(d: jax.Array) -> jax.Array:
    if d.ndim != 4:
      return d
    return jnp.broadcast_to(jnp.mean(jnp.abs(d), axis=axes, keepdims=True), d.shape)

  return jax.tree.map(average, diagonal)


def scale_by_adahessian(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-4,
    hessian_power: ArrayLike = 1.0,
    update_each: int = 1,
    mu_dtype: DTypeLike | None = None,
    *,
    key: jax.Array | int = 0,
    conv_spatial_axes: Sequence[int] | None = (0, 1),
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescales gradients by the AdaHessian rule (module docstring); no learning rate, no decay.

  `update(grads, state, params, obj_fn=f)` with `f(params) -> scalar`.

  Args:
    b1: Decay rate of the gradient average.
    b2: Decay rate of the average of squared Hessian-diagonal estimates.
    eps: Added to the denominator (v_hat ** (hessian_power / 2)).
    hessian_power: Exponent k in (0, 1]; 1 is the full Newton-like scaling, 1/2 is Adam-like.
    update_each: Draw a new Hessian-diagonal estimate every this many steps (>= 1).
    mu_dtype: dtype of the gradient average; `None` keeps the parameters' dtype.
    key: PRNG key (or integer seed) for the Rademacher vectors.
    conv_spatial_axes: Axes of 4-D leaves to average |estimate| over: (0, 1) for Flax HWIO
      kernels, (2, 3) for PyTorch OIHW, None for no averaging.
    axis_name: Data-parallel axis over which Hessian estimates are averaged (module docstring).

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  check_hyperparameters("adahessian", DECAY_RATE, "Defaults: b1=0.9, b2=0.999.", b1=b1, b2=b2)
  check_hyperparameters("adahessian", _HESSIAN_POWER, hessian_power=hessian_power)
  if isinstance(update_each, int) and update_each < 1:
    raise ValueError(f"adahessian: update_each must be a positive number of steps, got {update_each}.")
  check_hyperparameters("adahessian", NON_NEGATIVE, "The authors' default is 1e-4.", eps=eps)

  def init_fn(params: optax.Params) -> ScaleByAdaHessianState:
    return ScaleByAdaHessianState(
        count=jnp.zeros([], jnp.int32),
        key=_as_prng_key(key),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(
      updates: optax.Updates,
      state: ScaleByAdaHessianState,
      params: optax.Params | None = None,
      *,
      obj_fn: ObjectiveFn | None = None,
      **extra_args,
  ) -> tuple[optax.Updates, ScaleByAdaHessianState]:
    del extra_args
    if params is None or obj_fn is None:
      raise ValueError(
          "adahessian needs the parameters and the objective: call "
          "update(grads, state, params, obj_fn=lambda p: loss_fn(p, batch))."
      )
    key, subkey = jax.random.split(state.key)

    def refresh_nu() -> optax.Updates:
      diagonal = hutchinson_hessian_diagonal(obj_fn, params, subkey)
      if axis_name is not None:
        diagonal = jax.lax.pmean(diagonal, axis_name)
      diagonal = _spatial_average(diagonal, conv_spatial_axes)
      return optax.tree.cast_like(optax.tree.update_moment_per_elem_norm(diagonal, state.nu, b2, 2), state.nu)

    nu = jax.lax.cond(state.count % update_each == 0, refresh_nu, lambda: state.nu)
    mu = optax.tree.cast_like(optax.tree.update_moment(updates, state.mu, b1, 1), state.mu)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    new_updates = jax.tree.map(
        lambda m, v, g: (m / (jnp.power(v, hessian_power / 2) + eps)).astype(g.dtype), mu_hat, nu_hat, updates
    )
    return new_updates, ScaleByAdaHessianState(count=count, key=key, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adahessian(
    learning_rate: optax.ScalarOrSchedule = 0.15,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-4,
    weight_decay: ArrayLike = 0.0,
    hessian_power: ArrayLike = 1.0,
    update_each: int = 1,
    mu_dtype: DTypeLike | None = None,
    *,
    key: jax.Array | int = 0,
    conv_spatial_axes: Sequence[int] | None = (0, 1),
    axis_name: str | None = None,
    mask: optax.Params | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdaHessian with decoupled weight decay, defaults of the authors' code.

  `theta <- theta - learning_rate * (u + weight_decay * theta)` with `u` from `scale_by_adahessian`.
  Call `tx.update(grads, state, params, obj_fn=f)` with `f(params) -> scalar loss`.

  Args:
    learning_rate: A float or an optax schedule.
    b1: Decay rate of the gradient average.
    b2: Decay rate of the average of squared Hessian-diagonal estimates.
    eps: Added to the denominator.
    weight_decay: Decoupled weight decay, multiplied by the learning rate.
    hessian_power: Exponent k in (0, 1] of the Hessian scaling.
    update_each: Draw a new Hessian-diagonal estimate every this many steps.
    mu_dtype: dtype of the gradient average; `None` keeps the parameters' dtype.
    key: PRNG key (or integer seed) for the Rademacher vectors.
    conv_spatial_axes: Spatial axes of 4-D conv kernels to average over ((0, 1) for Flax HWIO).
    axis_name: Data-parallel axis over which Hessian estimates are averaged.
    mask: Tree (or callable returning one) of booleans: where to apply weight decay.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  return optax.chain(
      scale_by_adahessian(
          b1,
          b2,
          eps,
          hessian_power,
          update_each,
          mu_dtype,
          key=key,
          conv_spatial_axes=conv_spatial_axes,
          axis_name=axis_name,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
