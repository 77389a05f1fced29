r"""EXAdam: Adam with cross-moment bias corrections and a gradient-accelerated step.

Paper: "EXAdam: The Power of Adaptive Cross-Moments", Ahmed M. Adly, 2024, arXiv:2412.20302.

Reference implementation followed: the author's official code (``exadam.py`` in the GitHub
repository AhmedMostafa16/EXAdam; not on PyPI), including its defaults ``eps=1e-8`` and its
decoupled weight decay :math:`\theta \leftarrow (1 - \alpha\lambda)\theta` before the step.

With :math:`t` counted from 1:

.. math::

  m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
  d_{1,t} &= 1 + \beta_2^t \frac{v_t}{v_t + \epsilon}, \qquad
  d_{2,t} = 1 + \beta_1^t \frac{m_t^2}{m_t^2 + \epsilon} \\
  \tilde m_t &= \frac{m_t}{1-\beta_1^t} d_{1,t}, \qquad
  \tilde g_t = \frac{g_t}{1-\beta_1^t} d_{1,t}, \qquad
  \tilde v_t = \frac{v_t}{1-\beta_2^t} d_{2,t} \\
  \theta_t &= \theta_{t-1} - \alpha_t \lambda \theta_{t-1}
      - \alpha_t \frac{\tilde m_t + \tilde g_t}{\sqrt{\tilde v_t} + \epsilon}.

Each moment's correction is scaled by the *other* moment's signal-to-noise term (the
"cross-moments"), and the current gradient enters the numerator directly. The paper also
discusses a growing step-size schedule; the official code applies none, and neither does this
module (give any schedule as ``learning_rate``).

``pytorch_optimizer.EXAdam`` (4.1) computes the same update with the same defaults (its
``weight_decouple=True, fixed_decay=False``); both are checked in ``tests/optim/exadam_test.py``,
the official code as a float64 transcription. optax has no EXAdam.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters


class EXAdamState(NamedTuple):
  """State of :func:`scale_by_exadam`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # EMA of gradients, m_t
  nu: optax.Updates  # EMA of squared gradients, v_t


def scale_by_exadam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformation:
  """Rescales updates to EXAdam's direction (m~_t + g~_t) / (sqrt(v~_t) + eps), before -lr.

  Args:
    b1: decay of the gradient EMA m_t.
    b2: decay of the squared-gradient EMA v_t.
    eps: in the cross-moment ratios and added to sqrt(v~_t) in the denominator.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`EXAdamState`.
  """
  check_hyperparameters("EXAdam", DECAY_RATE, "Defaults: b1=0.9, b2=0.999, eps=1e-8.", b1=b1, b2=b2)
  check_hyperparameters("EXAdam", NON_NEGATIVE, eps=eps)

  def init_fn(params: optax.Params) -> EXAdamState:
    return EXAdamState(
        count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params)
    )

  def update_fn(
      updates: optax.Updates, state: EXAdamState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, EXAdamState]:
    del params
    count = numerics.safe_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64
    b1_t, b2_t = b1**t, b2**t

    def direction(g, m, v):
      d1 = 1.0 + b2_t * v / (v + eps)
      d2 = 1.0 + b1_t * m * m / (m * m + eps)
      numerator = (m + g) * d1 / (1.0 - b1_t)
      return numerator / (jnp.sqrt(v / (1.0 - b2_t) * d2) + eps)

    new_updates = jax.tree.map(direction, updates, mu, nu)
    new_state = EXAdamState(
        count=count, mu=optax.tree.cast_like(mu, state.mu), nu=optax.tree.cast_like(nu, state.nu)
    )
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def exadam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  """EXAdam with the author's defaults and decoupled weight decay (lr * weight_decay * theta).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, eps: see :func:`scale_by_exadam`.
    weight_decay: decoupled decay coefficient lambda; the parameters shrink by lr * lambda.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("EXAdam", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      scale_by_exadam(b1, b2, eps),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
