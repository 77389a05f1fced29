r"""SWATS: Adam that switches to SGD with momentum once its implied SGD learning rate settles.

Paper: "Improving Generalization Performance by Switching from Adam to SGD", Nitish Shirish
Keskar, Richard Socher, 2017, arXiv:1712.07628.

Reference followed: the paper's Algorithm 1 (the authors released no code), with its defaults
:math:`\alpha = 10^{-3}`, :math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-9}`. With :math:`t`
counted from 1, while in the Adam phase:

.. math::

  m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
  p_t &= -\alpha_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t} + \epsilon},
      \qquad \theta_t = \theta_{t-1} + p_t \\
  \gamma_t &= \frac{p_t^\top p_t}{-p_t^\top g_t}, \qquad
  \lambda_t = \beta_2 \lambda_{t-1} + (1-\beta_2) \gamma_t \qquad (\text{both only if } p_t^\top g_t \ne 0) \\
  &\text{if } t > 1,\ \Lambda = \lambda_t / (1-\beta_2^t) > 0 \text{ and }
      |\Lambda - \gamma_t| < \epsilon: \text{ switch to SGD with learning rate } \Lambda.

:math:`\gamma_t` is the SGD learning rate whose step, projected on Adam's step, equals it. In the
SGD phase (from the step after the switch on) :math:`b_t = \beta_1 b_{t-1} + g_t` and
:math:`\theta_t = \theta_{t-1} - (1-\beta_1)\Lambda b_t`, with :math:`b` starting at zero. The dot
products run over the whole parameter tree (the paper's vector), so the whole tree switches at
once. :math:`\Lambda` is fixed once estimated: a ``learning_rate`` schedule acts on the Adam phase
only. Weight decay is an L2 penalty added to the gradient (in both phases).

``pytorch_optimizer.SWATS`` (4.1), the only packaged version, differs: it estimates
:math:`\gamma` and :math:`\lambda` per tensor and switches the whole parameter group when any
tensor meets the criterion (taking that tensor's :math:`\Lambda`), tests the criterion as
``allclose(Λ, γ, rtol=eps)`` (relative, plus torch's ``atol=1e-8``), defaults to ``eps=1e-6``,
adds 1e-15 under the root, and its torch schedulers overwrite :math:`\Lambda` after the switch.
For a single tensor with no schedule it computes the same steps (pinned by
``tests/optim/swats_test.py``). Its ``nesterov`` option is not offered. optax has no SWATS.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters


class SwatsState(NamedTuple):
  """State of :func:`scale_by_swats`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # EMA of gradients, m_t (frozen after the switch)
  nu: optax.Updates  # EMA of squared gradients, v_t (frozen after the switch)
  momentum: optax.Updates  # SGD phase's momentum buffer b_t (zero before the switch)
  sgd_lr_ema: jax.Array  # lambda_t, the EMA of the projected SGD learning rates gamma_t
  sgd_lr: jax.Array  # Lambda, the SGD learning rate fixed at the switch (0 before)
  sgd_phase: jax.Array  # bool, whether the switch has happened


def _dot(a: optax.Updates, b: optax.Updates, dtype: jnp.dtype) -> jax.Array:
  """The dot product of two trees over all leaves, accumulated in `dtype`."""
  return sum(
      (jnp.vdot(x.astype(dtype), y.astype(dtype)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
      jnp.zeros([], dtype),
  )


def scale_by_swats(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-9,
) -> optax.GradientTransformation:
  """Returns SWATS's step (learning rate included, not negated): Adam's -p_t, then (1 - b1) Lambda b_t.

  Args:
    learning_rate: the Adam phase's learning rate, a float or an optax schedule of the step count;
      it enters the projection, so it cannot be applied afterwards.
    b1: decay of the gradient EMA m_t and the SGD momentum.
    b2: decay of the squared-gradient EMA v_t and of the EMA of gamma_t.
    eps: added to sqrt(v_t); also the switching tolerance |Lambda - gamma_t| < eps.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`SwatsState`.
  """
  check_hyperparameters("SWATS", NON_NEGATIVE, learning_rate=learning_rate)
  check_hyperparameters("SWATS", DECAY_RATE, "Defaults: b1=0.9, b2=0.999, eps=1e-9.", b1=b1, b2=b2)
  check_hyperparameters("SWATS", NON_NEGATIVE, eps=eps)

  def init_fn(params: optax.Params) -> SwatsState:
    mu, nu, momentum = (optax.tree.zeros_like(params) for _ in range(3))
    scalar = jnp.zeros([], jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64
    return SwatsState(
        count=jnp.zeros([], jnp.int32),
        mu=mu,
        nu=nu,
        momentum=momentum,
        sgd_lr_ema=scalar,
        sgd_lr=jnp.zeros_like(scalar),
        sgd_phase=jnp.zeros([], bool),
    )

  def update_fn(
      updates: optax.Updates, state: SwatsState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, SwatsState]:
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = numerics.safe_increment(state.count)
    t = count.astype(state.sgd_lr_ema.dtype)
    in_sgd = state.sgd_phase

    # SGD phase.
    momentum = jax.tree.map(lambda b, g: jnp.where(in_sgd, b1 * b + g, b), state.momentum, updates)
    sgd_step = jax.tree.map(lambda b: (1.0 - b1) * state.sgd_lr * b, momentum)

    # Adam phase: the step s_t = -p_t and the projected learning rate gamma_t = s.s / s.g.
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    step_size = lr * jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    adam_step = jax.tree.map(lambda m, v: step_size * m / (jnp.sqrt(v) + eps), mu, nu)
    step_dot_grad, step_sq_norm = _dot(adam_step, updates, t.dtype), _dot(adam_step, adam_step, t.dtype)
    projected = step_dot_grad != 0.0
    gamma = step_sq_norm / jnp.where(projected, step_dot_grad, 1.0)
    sgd_lr_ema = jnp.where(projected, b2 * state.sgd_lr_ema + (1.0 - b2) * gamma, state.sgd_lr_ema)
    estimate = sgd_lr_ema / (1.0 - b2**t)
    switch = (count > 1) & projected & (estimate > 0.0) & (jnp.abs(estimate - gamma) < eps)

    new_updates = jax.tree.map(lambda s, a: jnp.where(in_sgd, s, a), sgd_step, adam_step)
    new_state = SwatsState(
        count=count,
        mu=optax.tree.cast_like(
            jax.tree.map(lambda new, old: jnp.where(in_sgd, old, new), mu, state.mu), state.mu
        ),
        nu=optax.tree.cast_like(
            jax.tree.map(lambda new, old: jnp.where(in_sgd, old, new), nu, state.nu), state.nu
        ),
        momentum=optax.tree.cast_like(momentum, state.momentum),
        sgd_lr_ema=jnp.where(in_sgd, state.sgd_lr_ema, sgd_lr_ema),
        sgd_lr=jnp.where(in_sgd | ~switch, state.sgd_lr, estimate),
        sgd_phase=in_sgd | switch,
    )
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def swats(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-9,
    weight_decay: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  """SWATS with the paper's defaults and L2 weight decay.

  Args:
    learning_rate: the Adam phase's learning rate, a float or an optax schedule of the step count.
    b1, b2, eps: see :func:`scale_by_swats`.
    weight_decay: L2 coefficient lambda; lambda * theta is added to the gradient.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("SWATS", NON_NEGATIVE, weight_decay=weight_decay)
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      scale_by_swats(learning_rate, b1, b2, eps),
      optax.scale(-1.0),
  )
