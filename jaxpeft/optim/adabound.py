r"""AdaBound and AMSBound: Adam whose per-coordinate step sizes are clipped to a band closing on SGD's.

Paper: "Adaptive Gradient Methods with Dynamic Bound of Learning Rate", Liangchen Luo, Yuanhao
Xiong, Yan Liu, Xu Sun, ICLR 2019, arXiv:1902.09843.

Reference implementation followed: the authors' PyPI package ``adabound`` 0.0.5
(``adabound.AdaBound``), including its defaults ``final_lr=0.1``, ``gamma=1e-3``, ``eps=1e-8`` and
its weight decay as an L2 penalty added to the gradient.

With :math:`t` counted from 1, learning rate :math:`\alpha_t` and final (SGD) learning rate
:math:`\alpha^*_t`:

.. math::

  g_t &\leftarrow g_t + \lambda\theta_{t-1}, \qquad
  m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
  \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (AMSBound) or } v_t \text{ (AdaBound)} \\
  \eta_t &= \frac{\alpha_t \sqrt{1-\beta_2^t} / (1-\beta_1^t)}{\sqrt{\hat v_t} + \epsilon}, \qquad
  \eta_l(t) = \alpha^*_t \Bigl(1 - \frac{1}{\gamma t + 1}\Bigr), \quad
  \eta_u(t) = \alpha^*_t \Bigl(1 + \frac{1}{\gamma t}\Bigr) \\
  \theta_t &= \theta_{t-1} - \operatorname{clip}(\eta_t, \eta_l(t), \eta_u(t))\, m_t.

Early on the band :math:`[\eta_l, \eta_u]` is wide (0 to :math:`\infty` at :math:`t = 1`) and the
steps are Adam's; as :math:`t` grows it closes on :math:`\alpha^*`, and the step becomes SGD with
momentum at learning rate :math:`\alpha^*`.

Since the clipped step size contains :math:`\alpha_t`, :func:`scale_by_adabound` takes the learning
rate (evaluated at the state's step count, 0 for the first update, like
``optax.scale_by_learning_rate``) and returns the positive step; the factory flips the sign.

Where the references differ (pinned by ``tests/optim/adabound_test.py``):

* Schedules. The authors scale ``final_lr`` by ``lr / base_lr`` (the lr a torch scheduler set over
  the lr the optimizer was built with), so a schedule moves the SGD target too. That ratio cannot
  be formed under ``optax.inject_hyperparams``, which hands the factory the current lr only, so here
  ``final_lr`` is its own float or schedule: ``final_lr=lambda t: 0.1 * schedule(t) / lr0``
  reproduces the authors' run with the schedule ``schedule`` and base lr ``lr0``.
* ``pytorch_optimizer.AdaBound`` defaults to decoupled weight decay (``weight_decouple=True``);
  the authors' L2 penalty is its ``weight_decouple=False``. It also adds 1e-15 under the square
  root (a relative change below 1e-9 here) and calls AMSBound ``ams_bound``.
* The authors' repository also has ``AdaBoundW`` (decoupled decay), which is not in the PyPI
  package and not offered here. optax has no AdaBound.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, POSITIVE, check_hyperparameters


class AdaBoundState(NamedTuple):
  """State of :func:`scale_by_adabound`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # EMA of gradients, m_t
  nu: optax.Updates  # EMA of squared gradients, v_t
  nu_max: optax.Updates | None  # running max of v_t (amsbound only, else None)


def _evaluate(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.typing.ArrayLike:
  return value(count) if callable(value) else value


def scale_by_adabound(
    learning_rate: optax.ScalarOrSchedule,
    final_lr: optax.ScalarOrSchedule = 0.1,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    gamma: jax.typing.ArrayLike = 1e-3,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    amsbound: bool = False,
) -> optax.GradientTransformation:
  """Returns the clipped step clip(eta_t, eta_l, eta_u) * m_t (learning rate included, not negated).

  Args:
    learning_rate: Adam's learning rate, a float or an optax schedule of the step count.
    final_lr: the SGD learning rate the bounds converge to (float or schedule; see the module doc
      for how the authors tie it to an lr schedule).
    b1: decay of the gradient EMA m_t.
    b2: decay of the squared-gradient EMA v_t.
    gamma: convergence speed of the bounds (the band is within ~1/(gamma t) of final_lr).
    eps: added to sqrt(v_t) in the denominator.
    amsbound: divide by the running maximum of v_t (AMSBound).

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`AdaBoundState`.
  """
  check_hyperparameters("AdaBound", NON_NEGATIVE, learning_rate=learning_rate, final_lr=final_lr)
  defaults = "Defaults: b1=0.9, b2=0.999, gamma=1e-3."
  check_hyperparameters("AdaBound", DECAY_RATE, defaults, b1=b1, b2=b2, gamma=gamma)
  check_hyperparameters("AdaBound", POSITIVE, "The authors' default is gamma=1e-3.", gamma=gamma)
  check_hyperparameters("AdaBound", NON_NEGATIVE, eps=eps)

  def init_fn(params: optax.Params) -> AdaBoundState:
    return AdaBoundState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        nu_max=optax.tree.zeros_like(params) if amsbound else None,
    )

  def update_fn(
      updates: optax.Updates, state: AdaBoundState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, AdaBoundState]:
    del params
    lr, target = _evaluate(learning_rate, state.count), _evaluate(final_lr, state.count)
    count = numerics.safe_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsbound else None
    t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64
    step_size = lr * jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    lower = target * (1.0 - 1.0 / (gamma * t + 1.0))
    upper = target * (1.0 + 1.0 / (gamma * t))

    def clipped_step(m, v):
      return jnp.clip(step_size / (jnp.sqrt(v) + eps), lower, upper) * m

    new_updates = jax.tree.map(clipped_step, mu, nu_max if amsbound else nu)
    new_state = AdaBoundState(
        count=count,
        mu=optax.tree.cast_like(mu, state.mu),
        nu=optax.tree.cast_like(nu, state.nu),
        nu_max=optax.tree.cast_like(nu_max, state.nu_max) if amsbound else None,
    )
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adabound(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    final_lr: optax.ScalarOrSchedule = 0.1,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    gamma: jax.typing.ArrayLike = 1e-3,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    amsbound: bool = False,
) -> optax.GradientTransformation:
  """AdaBound (``amsbound=True``: AMSBound) with the authors' defaults and L2 weight decay.

  Args:
    learning_rate: Adam's learning rate, a float or an optax schedule of the step count.
    final_lr, b1, b2, gamma, eps, amsbound: see :func:`scale_by_adabound`.
    weight_decay: L2 coefficient lambda; lambda * theta is added to the gradient.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("AdaBound", NON_NEGATIVE, weight_decay=weight_decay)
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      scale_by_adabound(learning_rate, final_lr, b1, b2, gamma, eps, amsbound=amsbound),
      optax.scale(-1.0),
  )
