r"""AdaMod: Adam whose per-coordinate step sizes are bounded by their own moving average.

Paper: "An Adaptive and Momental Bound Method for Stochastic Learning", Jianbang Ding, Xuancheng
Ren, Ruixuan Luo, Xu Sun, 2019, arXiv:1910.12249.

Reference implementation followed: the authors' PyPI package ``adamod`` 0.0.3
(``adamod.AdaMod``), including its defaults ``b3=0.999`` (its docstring says 0.9999, its code uses
0.999), ``eps=1e-8`` and decoupled weight decay.

With :math:`t` counted from 1 and learning rate :math:`\alpha_t`:

.. math::

  m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
  \eta_t &= \frac{\alpha_t \sqrt{1-\beta_2^t} / (1-\beta_1^t)}{\sqrt{v_t} + \epsilon}
      \qquad \text{(Adam's per-coordinate step size)} \\
  s_t &= \beta_3 s_{t-1} + (1-\beta_3) \eta_t, \qquad \hat\eta_t = \min(\eta_t, s_t) \\
  \theta_t &= \theta_{t-1} - \hat\eta_t m_t - \alpha_t \lambda \theta_{t-1}.

Because :math:`s_t` averages step sizes that already contain :math:`\alpha_t`, a learning-rate
schedule changes the bound itself, so :func:`scale_by_adamod` takes the learning rate (evaluated
at the state's step count, 0 for the first update, like ``optax.scale_by_learning_rate``) and
returns the positive step :math:`\hat\eta_t m_t`; the factory adds the decay and flips the sign.

``pytorch_optimizer.AdaMod`` computes the same update but defaults to
``betas=(0.9, 0.99, 0.9999)``; it also offers an L2 (``weight_decouple=False``) and a
``fixed_decay`` variant that the authors do not have and this module does not offer. optax has no
AdaMod.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters


class AdaModState(NamedTuple):
  """State of :func:`scale_by_adamod`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # EMA of gradients, m_t
  nu: optax.Updates  # EMA of squared gradients, v_t
  eta: optax.Updates  # EMA of the step sizes eta_t, s_t


def scale_by_adamod(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformation:
  """Returns the bounded step min(eta_t, s_t) * m_t (learning rate included, not negated).

  Args:
    learning_rate: a float or an optax schedule of the step count; it enters the averaged
      step sizes, so it cannot be applied afterwards.
    b1: decay of the gradient EMA m_t.
    b2: decay of the squared-gradient EMA v_t.
    b3: decay of the step-size EMA s_t that bounds each step from above.
    eps: added to sqrt(v_t) in the denominator.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`AdaModState`.
  """
  check_hyperparameters("AdaMod", NON_NEGATIVE, learning_rate=learning_rate)
  check_hyperparameters(
      "AdaMod", DECAY_RATE, "Defaults: b1=0.9, b2=0.999, b3=0.999, eps=1e-8.", b1=b1, b2=b2, b3=b3
  )
  check_hyperparameters("AdaMod", NON_NEGATIVE, eps=eps)

  def init_fn(params: optax.Params) -> AdaModState:
    # Three distinct buffers (one shared buffer could not be donated three times to a jitted step).
    mu, nu, eta = (optax.tree.zeros_like(params) for _ in range(3))
    return AdaModState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, eta=eta)

  def update_fn(
      updates: optax.Updates, state: AdaModState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, AdaModState]:
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = numerics.safe_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    step_size = lr * jnp.sqrt(1.0 - b2**count) / (1.0 - b1**count)
    step_sizes = lambda v: step_size / (jnp.sqrt(v) + eps)  # eta_t
    eta = optax.tree.update_moment(jax.tree.map(step_sizes, nu), state.eta, b3, 1)
    # eta_t is recomputed from v_t (read anyway) rather than shared: shared, XLA writes it to memory
    # as its own full-size array and reads it back twice. The barrier keeps CSE from re-sharing it.
    nu_again = jax.lax.optimization_barrier(nu)
    new_updates = jax.tree.map(lambda v, s, m: jnp.minimum(step_sizes(v), s) * m, nu_again, eta, mu)
    new_state = AdaModState(
        count=count,
        mu=optax.tree.cast_like(mu, state.mu),
        nu=optax.tree.cast_like(nu, state.nu),
        eta=optax.tree.cast_like(eta, state.eta),
    )
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adamod(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  """AdaMod with the authors' defaults and decoupled weight decay (lr * weight_decay * theta).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, b3, eps: see :func:`scale_by_adamod`.
    weight_decay: decoupled decay coefficient lambda; the parameters shrink by lr * lambda.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("AdaMod", NON_NEGATIVE, weight_decay=weight_decay)
  if callable(learning_rate):

    def decay(count: jax.Array) -> jax.Array:
      return weight_decay * learning_rate(count)

  else:
    decay = weight_decay * learning_rate
  return optax.chain(
      scale_by_adamod(learning_rate, b1, b2, b3, eps),
      optax.add_decayed_weights(decay),
      optax.scale(-1.0),
  )
