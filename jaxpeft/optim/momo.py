r"""MoMo and MoMo-Adam: momentum methods with a model-based (Polyak-type) adaptive step size.

Paper: "MoMo: Momentum Models for Adaptive Learning Rates", Fabian Schaipp, Ruben Ohana, Michael
Eickenberg, Aaron Defazio and Robert M. Gower, ICML 2024, arXiv:2305.07583.

Both methods keep exponential averages of the gradients :math:`g_j`, of the losses :math:`f_j`
and of :math:`\langle g_j, x_j\rangle`, which define a model of the loss whose minimum (clipped
at the lower bound :math:`f_*`) gives the step size. With momentum :math:`\beta`, learning rate
:math:`\alpha_k`, weight decay :math:`\lambda`, :math:`c_k = 1 + \alpha_k\lambda`, and a diagonal
preconditioner :math:`D_k` (:math:`I` for MoMo):

.. math::

  d_k &= \beta d_{k-1} + (1-\beta) g_k, \quad
  \bar f_k = \beta \bar f_{k-1} + (1-\beta) f_k, \quad
  \gamma_k = \beta \gamma_{k-1} + (1-\beta) \langle g_k, x_k\rangle \\
  \tau_k &= \min\Big\{\frac{\alpha_k}{\rho_k},\
      \frac{\big(c_k(\bar f_k - \rho_k f_*) + \langle d_k, x_k\rangle - c_k\gamma_k\big)_+}
           {\langle d_k, D_k^{-1} d_k\rangle}\Big\} \\
  x_{k+1} &= \frac{x_k - \tau_k D_k^{-1} d_k}{c_k}

* **MoMo** (`momo`): :math:`D_k = I`. Default (``bias_correction=False``): the averages start at
  the first gradient / loss / inner product and :math:`\rho_k = 1`; ``bias_correction=True``:
  they start at zero and :math:`\rho_k = 1 - \beta^k`.
* **MoMo-Adam** (`momo_adam`): :math:`\beta = b_1`, averages start at zero, :math:`\rho_k = 1 -
  b_1^k`, and :math:`D_k = \sqrt{v_k / (1 - b_2^k)} + \epsilon` with Adam's
  :math:`v_k = b_2 v_{k-1} + (1-b_2) g_k^2`. ``divide=False`` swaps the proximal weight decay
  :math:`x_{k+1} = (\cdot)/c_k` for AdamW's :math:`x_{k+1} = (1-\alpha_k\lambda)x_k - \tau_k
  D_k^{-1}d_k` (the step size keeps the :math:`c_k` factors, as in the reference).

``use_fstar=True`` (MoMo* in the paper) estimates :math:`f_*` online: before the step, if
:math:`h = c_k\bar f_k + \langle d_k, x_k\rangle - c_k\gamma_k < c_k\rho_k f_*` the estimate is
reset to :math:`\max(h / (2c_k\rho_k), f_*^{0})`; after it,
:math:`f_* \leftarrow \max\big((\bar f_k + \langle d_k, x_k\rangle - \gamma_k - \tfrac12\tau_k
\langle d_k, D_k^{-1}d_k\rangle)/\rho_k,\ f_*^{0}\big)` with :math:`f_*^{0}` = ``lower_bound``.

Reference followed: the authors' package momo-opt 0.1.0 (import name ``momo``; classes
``momo.Momo``: ``lr=1.0, beta=0.9, lb=0, weight_decay=0, bias_correction=False, use_fstar=False``,
and ``momo.MomoAdam``: ``lr=1e-2, betas=(0.9, 0.999), eps=1e-8, lb=0, weight_decay=0,
divide=True, use_fstar=False``). Names follow optax: ``beta``/``b1``/``b2``, ``lower_bound`` for
``lb``; the switches keep the authors' names ``bias_correction``, ``divide``, ``use_fstar`` (optax's
``adapt_lower_bound``). The learning rate may be a schedule: it is evaluated at the number of
steps already taken. When :math:`\langle d_k, D_k^{-1}d_k\rangle = 0` (zero gradients) the
reference's ``min(lr, nan)`` picks ``lr``; here too, so the step is :math:`\tau_k\cdot 0` and no
NaN appears.

Why not ``optax.contrib.momo`` / ``momo_adam`` (optax 0.2.8)? They return
:math:`-\tfrac{\alpha\lambda}{c}x_k - \tau_k D_k^{-1}d_k`, i.e.
:math:`x_{k+1} = x_k / c_k - \tau_k D_k^{-1}d_k`: the gradient step is not divided by
:math:`c_k = 1 + \alpha_k\lambda`, unlike the paper's proximal step and the authors' code. With
``weight_decay=0`` they agree with the reference (tested), with weight decay their gradient step
is :math:`c_k` times larger (tested as a documented offset). They also set the adaptive term to 0
(no step) when :math:`\langle d_k, D_k^{-1}d_k\rangle \le 2.2\cdot 10^{-16}` where the reference
steps, keep :math:`\bar f, \gamma, f_*` in the parameters' dtype (bfloat16 for bfloat16
parameters), have no ``bias_correction`` / ``divide`` switches, and no cross-device reduction.

Sharding (``axis_name``): the name of a mapped axis (pmap / shard_map) over which the
*parameters* are sharded, each device holding a distinct slice (e.g. FSDP). The inner products and
norms over all parameters are ``psum``-ed and the loss ``pmean``-ed over it (the latter is
idempotent if the loss is already global), so every device takes the single-device step. With
replicated parameters (plain data parallelism) leave it ``None`` and pass the averaged loss and
gradients (``jax.lax.pmean``) as usual: a ``psum`` over replicated inner products would count them
once per device.

Scalars (:math:`\bar f, \gamma, f_*` and the inner products) are kept in at least float32; the
averaged gradients keep the parameters' dtype.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters

_P = ParamSpec("_P")
_R = TypeVar("_R")


class MomoState(NamedTuple):
  """State of `scale_by_momo`."""

  count: jax.Array  # shape=(), int32: number of steps taken.
  exp_avg: optax.Updates  # d_k, averaged gradients.
  loss_avg: jax.Array  # \bar f_k.
  grad_dot_w: jax.Array  # gamma_k, averaged <g_j, x_j>.
  lower_bound: jax.Array  # current estimate of f_* (constant unless use_fstar).


class MomoAdamState(NamedTuple):
  """State of `scale_by_momo_adam`."""

  count: jax.Array  # shape=(), int32: number of steps taken.
  exp_avg: optax.Updates  # d_k, averaged gradients.
  exp_avg_sq: optax.Updates  # v_k, averaged squared gradients.
  loss_avg: jax.Array  # \bar f_k.
  grad_dot_w: jax.Array  # gamma_k, averaged <g_j, x_j>.
  lower_bound: jax.Array  # current estimate of f_* (constant unless use_fstar).


def _check_update_args(name: str, params: optax.Params | None, value: ArrayLike | None) -> None:
  if params is None:
    raise ValueError(f"{name} needs the parameters: call update(grads, state, params, value=loss).")
  if value is None:
    raise ValueError(
        f"{name} needs the current loss: call update(grads, state, params, value=loss), e.g. with "
        "loss, grads = jax.value_and_grad(loss_fn)(params)."
    )
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name}: value must be the scalar loss, got shape {jnp.shape(value)}.")


def _scalar_dtype(params: optax.Params) -> jnp.dtype:
  """At least float32 for the scalar averages (bf16 inner products lose too much)."""
  return jnp.promote_types(optax.tree.dtype(params, "highest"), jnp.float32)


def _vdot(a: optax.Params, b: optax.Params, dtype: jnp.dtype, axis_name: str | None) -> jax.Array:
  """<a, b> over all leaves in `dtype`, summed over `axis_name` shards."""
  result = optax.tree.vdot(optax.tree.cast(a, dtype), optax.tree.cast(b, dtype))
  return result if axis_name is None else jax.lax.psum(result, axis_name)


class _Averages(NamedTuple):
  """The exponential averages both methods keep, in their state's field order."""

  exp_avg: optax.Updates
  loss_avg: jax.Array
  grad_dot_w: jax.Array


class _StepConfig(NamedTuple):
  """Hyperparameters of the model-based step that MoMo and MoMo-Adam share."""

  learning_rate: optax.ScalarOrSchedule
  weight_decay: ArrayLike
  initial_lower_bound: ArrayLike
  use_fstar: bool
  axis_name: str | None


def _init_state(
    state_type: type[MomoState | MomoAdamState],
    params: optax.Params,
    lower_bound: ArrayLike,
    **other_fields: optax.Updates,
) -> MomoState | MomoAdamState:
  """Zero averages, scalars in `_scalar_dtype(params)`, and `other_fields` as given."""
  dtype = _scalar_dtype(params)
  return state_type(
      count=jnp.zeros([], jnp.int32),
      exp_avg=optax.tree.zeros_like(params),
      loss_avg=jnp.zeros([], dtype),
      grad_dot_w=jnp.zeros([], dtype),
      lower_bound=jnp.asarray(lower_bound, dtype),
      **other_fields,
  )


def _update_averages(
    state: MomoState | MomoAdamState,
    updates: optax.Updates,
    params: optax.Params,
    value: ArrayLike,
    decay: ArrayLike,
    axis_name: str | None,
) -> _Averages:
  """Averages of gradients, loss (`pmean`-ed over `axis_name`) and <g_k, x_k> with `decay`."""
  dtype = state.loss_avg.dtype
  loss = jnp.asarray(value, dtype)
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return _Averages(
      exp_avg=optax.tree.cast_like(optax.tree.update_moment(updates, state.exp_avg, decay, 1), state.exp_avg),
      loss_avg=(decay * state.loss_avg + (1 - decay) * loss).astype(dtype),
      grad_dot_w=(decay * state.grad_dot_w + (1 - decay) * _vdot(params, updates, dtype, axis_name)).astype(dtype),
  )


def _transformation(
    name: str,
    init_fn: Callable[[optax.Params], MomoState | MomoAdamState],
    step: Callable[
        [optax.Updates, MomoState | MomoAdamState, optax.Params, ArrayLike, jax.Array],
        tuple[optax.Updates, MomoState | MomoAdamState],
    ],
) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of `init_fn` and `step(updates, state, params, value, new_count)`.

  Its `update(grads, state, params, value=loss)` checks that `params` and the scalar loss are given
  (other extra arguments are ignored) before taking the step.
  """

  def update_fn(
      updates: optax.Updates,
      state: MomoState | MomoAdamState,
      params: optax.Params | None = None,
      *,
      value: ArrayLike | None = None,
      **extra_args,
  ) -> tuple[optax.Updates, MomoState | MomoAdamState]:
    del extra_args
    _check_update_args(name, params, value)
    return step(updates, state, params, value, optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _model_step(
    config: _StepConfig,
    state: MomoState | MomoAdamState,
    params: optax.Params,
    averages: _Averages,
    *,
    direction: optax.Updates,
    norm_sq: jax.Array,
    rho: jax.Array,
    divide: bool,
) -> tuple[optax.Updates, jax.Array]:
  """The step shared by MoMo and MoMo-Adam: truncated-model step size and the parameter update.

  `direction` is D_k^{-1} d_k and `norm_sq` = <d_k, D_k^{-1} d_k>. Returns the update
  x_{k+1} - x_k and the new lower-bound estimate.
  """
  dtype = state.loss_avg.dtype
  loss_avg, grad_dot_w = averages.loss_avg, averages.grad_dot_w
  learning_rate, initial_lower_bound = config.learning_rate, config.initial_lower_bound
  alpha = jnp.asarray(learning_rate(state.count) if callable(learning_rate) else learning_rate, dtype)
  dot = _vdot(params, averages.exp_avg, dtype, config.axis_name)  # <d_k, x_k>
  c = 1 + alpha * config.weight_decay
  lb = state.lower_bound
  if config.use_fstar:
    cap = c * loss_avg + dot - c * grad_dot_w
    lb = jnp.where(cap < c * rho * lb, jnp.maximum(cap / (2 * c * rho), initial_lower_bound), lb)
  numerator = jnp.maximum(c * (loss_avg - rho * lb) + dot - c * grad_dot_w, 0.0)
  positive = norm_sq > 0
  t1 = jnp.where(positive, numerator / jnp.where(positive, norm_sq, 1.0), jnp.inf)
  tau = jnp.minimum(alpha / rho, t1)
  if config.use_fstar:
    lb = jnp.maximum((loss_avg + dot - grad_dot_w - 0.5 * tau * norm_sq) / rho, initial_lower_bound)

  def update(x: jax.Array, u: jax.Array) -> jax.Array:
    step = tau * u
    if divide:  # x_{k+1} = (x_k - tau u) / c
      out = -(step + (c - 1) * x) / c
    else:  # x_{k+1} = (1 - alpha lambda) x_k - tau u
      out = -(step + (c - 1) * x)
    return out.astype(x.dtype)

  return jax.tree.map(update, params, direction), lb.astype(state.lower_bound.dtype)


def scale_by_momo(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    beta: ArrayLike = 0.9,
    lower_bound: ArrayLike = 0.0,
    weight_decay: ArrayLike = 0.0,
    *,
    bias_correction: bool = False,
    use_fstar: bool = False,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The whole MoMo update (step size and weight decay need the learning rate, so it lives here).

  `update(grads, state, params, value=loss)` returns x_{k+1} - x_k; see the module docstring.

  Args:
    learning_rate: Upper bound alpha_k on the step size: a float or an optax schedule.
    beta: Momentum of the averages of gradients, losses and <g, x>.
    lower_bound: Lower bound f_* of the loss (0 suits most losses).
    weight_decay: Proximal weight decay lambda: x_{k+1} = (x_k - tau d_k) / (1 + alpha lambda).
    bias_correction: Start averages at zero and bias-correct (authors' `bias_correction`).
    use_fstar: Estimate the lower bound online, starting from and never below `lower_bound`.
    axis_name: Mapped axis over which parameters are sharded (see the module docstring).

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  check_hyperparameters("momo", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  check_hyperparameters("momo", DECAY_RATE, "The authors' default is 0.9.", beta=beta)
  config = _StepConfig(learning_rate, weight_decay, lower_bound, use_fstar, axis_name)

  def step(updates, state, params, value, count):
    dtype = state.loss_avg.dtype
    if bias_correction:
      b, rho = beta, 1 - jnp.asarray(beta, dtype) ** count
    else:  # the averages start at the first values
      b, rho = jnp.where(state.count == 0, 0.0, beta), jnp.ones([], dtype)
    averages = _update_averages(state, updates, params, value, b, axis_name)
    exp_avg = averages.exp_avg
    new_updates, lb = _model_step(
        config,
        state,
        params,
        averages,
        direction=exp_avg,
        norm_sq=_vdot(exp_avg, exp_avg, dtype, axis_name),
        rho=rho,
        divide=True,
    )
    return new_updates, MomoState(count, *averages, lb)

  return _transformation("momo", lambda params: _init_state(MomoState, params, lower_bound), step)


def scale_by_momo_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-2,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    lower_bound: ArrayLike = 0.0,
    weight_decay: ArrayLike = 0.0,
    *,
    divide: bool = True,
    use_fstar: bool = False,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The whole MoMo-Adam update; `update(grads, state, params, value=loss)`, see the module docstring.

  Args:
    learning_rate: Upper bound on the (bias-corrected) step size: a float or an optax schedule.
    b1: Momentum of the averages of gradients, losses and <g, x>.
    b2: Decay rate of the averaged squared gradients (Adam's second moment).
    eps: Added to sqrt(v_hat) in the preconditioner D_k.
    lower_bound: Lower bound f_* of the loss (0 suits most losses).
    weight_decay: Weight decay lambda (proximal if `divide`, else AdamW-style).
    divide: True: x_{k+1} = (x_k - tau D^-1 d) / (1 + alpha lambda) (authors' default). False:
      x_{k+1} = (1 - alpha lambda) x_k - tau D^-1 d.
    use_fstar: Estimate the lower bound online, starting from and never below `lower_bound`.
    axis_name: Mapped axis over which parameters are sharded (see the module docstring).

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  check_hyperparameters("momo_adam", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  check_hyperparameters("momo_adam", DECAY_RATE, "Defaults: b1=0.9, b2=0.999.", b1=b1, b2=b2)
  check_hyperparameters("momo_adam", NON_NEGATIVE, "The authors' default is 1e-8.", eps=eps)
  config = _StepConfig(learning_rate, weight_decay, lower_bound, use_fstar, axis_name)

  def init_fn(params: optax.Params) -> MomoAdamState:
    return _init_state(MomoAdamState, params, lower_bound, exp_avg_sq=optax.tree.zeros_like(params))

  def step(updates, state, params, value, count):
    dtype = state.loss_avg.dtype
    averages = _update_averages(state, updates, params, value, b1, axis_name)
    exp_avg_sq = optax.tree.cast_like(
        optax.tree.update_moment_per_elem_norm(updates, state.exp_avg_sq, b2, 2), state.exp_avg_sq
    )
    preconditioner = jax.tree.map(lambda s: jnp.sqrt(s) + eps, optax.tree.bias_correction(exp_avg_sq, b2, count))
    direction = jax.tree.map(jnp.divide, averages.exp_avg, preconditioner)
    new_updates, lb = _model_step(
        config,
        state,
        params,
        averages,
        direction=direction,
        norm_sq=_vdot(averages.exp_avg, direction, dtype, axis_name),
        rho=1 - jnp.asarray(b1, dtype) ** count,
        divide=divide,
    )
    return new_updates, MomoAdamState(
        count, averages.exp_avg, exp_avg_sq, averages.loss_avg, averages.grad_dot_w, lb
    )

  return _transformation("momo_adam", init_fn, step)


def _factory(core: Callable[_P, _R], name: str, doc: str) -> Callable[_P, _R]:
  """`core` under the factory's `name` and `doc`: MoMo's core transformation is already the whole update.

  The factory keeps the core's signature (`inspect.signature` follows `__wrapped__`), so
  `optax.inject_hyperparams` and the harness's keyword matching see the same arguments.
  """

  @functools.wraps(core)
  def factory(*args: _P.args, **kwargs: _P.kwargs) -> _R:
    return core(*args, **kwargs)

  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = doc
  return factory


momo = _factory(
    scale_by_momo,
    "momo",
    """MoMo (SGD with momentum and a model-based step size), defaults of the authors' `momo.Momo`.

    Pass the current loss: `tx.update(grads, state, params, value=loss)`. Arguments as
    `scale_by_momo`, which is the whole update (the step size itself needs the learning rate).
    """,
)

momo_adam = _factory(
    scale_by_momo_adam,
    "momo_adam",
    """MoMo-Adam (Adam with a model-based step size), defaults of the authors' `momo.MomoAdam`.

    Pass the current loss: `tx.update(grads, state, params, value=loss)`. Arguments as
    `scale_by_momo_adam`, which is the whole update (the step size itself needs the learning rate).
    """,
)
