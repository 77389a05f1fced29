r"""SANIA: a preconditioned stochastic Polyak step size from the loss value, without a tuned step size.

Paper: F. Abdukhakimov, C. Xiang, D. Kamzolov, R. Gower, M. Takáč, "Polyak-type Optimization
Framework Leads to Scale Invariant Stochastic Algorithms" (SANIA; earlier "Stochastic Gradient
Descent with Preconditioned Polyak Step-size"), arXiv:2310.00947 / 2023. The full paper text
could not be reached from here; this module follows the authors' PyTorch classes
``SANIA_AdamSQR`` and ``SANIA_AdagradSQR`` (read through a public code index whose repository
name was not shown), including their defaults ``lr=1.0, betas=(0.9, 0.999), eps=0.1,
is_sqrt=False``.

With the loss :math:`f_t` (given as ``value=``) and gradient :math:`g_t`, every step:

.. math::

  v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad \hat v_t = v_t / (1-\beta_2^t)
      \qquad (\text{"adam"; "adagrad": } \hat v_t = v_{t-1} + g_t^2) \\
  B_t &= \max(\epsilon, \hat v_t) \ \ (\text{or } \sqrt{\max(\epsilon, \hat v_t)} \text{ with is\_sqrt}),
      \qquad s_t = g_t / B_t, \qquad n_t = \langle s_t, g_t\rangle \ (\text{over all leaves}) \\
  \gamma_t &= \begin{cases} 1 - \sqrt{1 - 2 f_t / n_t} & \text{if } 2 f_t \le n_t
      \text{ and } 1 - 2 f_t / n_t > 0 \\ 1 & \text{otherwise} \end{cases}, \qquad
  \theta_t = \theta_{t-1} - \alpha_t \gamma_t s_t.

:math:`\gamma_t` is the smaller root of the Polyak-type condition
:math:`f_t - \gamma n_t + \tfrac{\gamma^2}{2} n_t = 0` (the quadratic model of the loss along
:math:`-s_t` reaching zero); without a root the step is the full preconditioned Newton-like
step. The first moment :math:`\beta_1` of the Adam class is unused by the authors' code and has
no argument here.

Deviations / choices: the authors' Adagrad class ignores ``lr`` (it steps by :math:`\gamma_t`
alone); here ``learning_rate`` multiplies both variants (the default 1.0 gives their step). The
authors' numpy classes (used for their convex experiments) add ``eps`` (1e-8) to
:math:`\hat v_t` instead of flooring it at ``eps``; the PyTorch classes' floor is followed.
Under ``pmap``/sharding the inner product :math:`n_t` is over the whole tree as given: pass the
loss and gradient already averaged across devices. No public package ships SANIA;
``tests/optim/sania_test.py`` checks against a float64 torch transcription of the authors' classes.
"""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters

PRECONDITIONERS = ("adam", "adagrad")


class SaniaState(NamedTuple):
  """State of :func:`scale_by_sania`."""

  count: jax.Array  # int32 number of updates so far
  nu: optax.Updates  # EMA (adam) or sum (adagrad) of squared gradients


def scale_by_sania(
    preconditioner: Literal["adam", "adagrad"] = "adam",
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 0.1,
    is_sqrt: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates to gamma_t * g / B_t, before -lr; needs the loss as ``value=``.

  Args:
    preconditioner: "adam" (bias-corrected EMA of g^2) or "adagrad" (running sum of g^2).
    b2: decay of the EMA (adam only).
    eps: floor of the diagonal preconditioner.
    is_sqrt: precondition with the square root of the floored second moment.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`SaniaState`.
  """
  if preconditioner not in PRECONDITIONERS:
    raise ValueError(f"SANIA: preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}.")
  check_hyperparameters("SANIA", DECAY_RATE, "Default: b2=0.999.", b2=b2)
  check_hyperparameters("SANIA", NON_NEGATIVE, eps=eps)

  def init_fn(params: optax.Params) -> SaniaState:
    return SaniaState(count=jnp.zeros([], jnp.int32), nu=optax.tree.zeros_like(params))

  def update_fn(
      updates: optax.Updates,
      state: SaniaState,
      params: optax.Params | None = None,
      *,
      value: jax.typing.ArrayLike | None = None,
      **extra_args,
  ) -> tuple[optax.Updates, SaniaState]:
    del params, extra_args
    if value is None:
      raise ValueError("SANIA needs the loss: call update(grads, state, params, value=loss).")
    count = numerics.safe_increment(state.count)
    if preconditioner == "adam":
      nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
      nu_hat = optax.tree.bias_correction(nu, b2, count)
    else:
      nu = jax.tree.map(lambda v, g: v + g * g, state.nu, updates)
      nu_hat = nu

    def direction(g, v):
      floored = jnp.maximum(eps, v)
      return g / (jnp.sqrt(floored) if is_sqrt else floored)

    search = jax.tree.map(direction, updates, nu_hat)
    norm = optax.tree.vdot(search, updates)
    det = 1.0 - 2.0 * value / norm
    has_root = (2.0 * value <= norm) & (det > 0.0)
    gamma = jnp.where(has_root, 1.0 - jnp.sqrt(jnp.where(has_root, det, 1.0)), 1.0)
    new_updates = jax.tree.map(lambda s: gamma * s, search)
    new_state = SaniaState(count=count, nu=optax.tree.cast_like(nu, state.nu))
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sania(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    preconditioner: Literal["adam", "adagrad"] = "adam",
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 0.1,
    is_sqrt: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SANIA with the authors' defaults; ``update`` needs the loss as ``value=``.

  Args:
    learning_rate: a float or an optax schedule multiplying the Polyak step (1.0: the authors').
    preconditioner, b2, eps, is_sqrt: see :func:`scale_by_sania`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  check_hyperparameters("SANIA", NON_NEGATIVE, learning_rate=learning_rate)
  return optax.chain(scale_by_sania(preconditioner, b2, eps, is_sqrt), optax.scale_by_learning_rate(learning_rate))
