r"""Grams: gradient descent with adaptive momentum scaling.

Paper: "Grams: Gradient Descent with Adaptive Momentum Scaling", Yang Cao, Xiaoyu Li and Zhao Song,
2024, arXiv:2412.17107.

Grams keeps Adam's two moments but takes the *direction* of each coordinate's step from the sign of
the current gradient, using the first moment only for the step's magnitude. With gradient
:math:`g_t`, decoupled weight decay :math:`\lambda` and learning rate :math:`\eta_t`:

.. math::

  m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
  v_t  = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
  u_t &= \operatorname{sign}(g_t) \odot
         \frac{|m_t| / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon / \sqrt{1 - \beta_2^t}} \\
  \theta_t &= \theta_{t-1} - \eta_t (u_t + \lambda \theta_{t-1})

Reference followed: the authors' package grams-pytorch 0.0.2 (``grams.Grams``; defaults
``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0, correct_bias=True``). Like Hugging Face's
AdamW, on which it is built, it adds :math:`\epsilon` to the *un-corrected* :math:`\sqrt{v_t}` and
folds both bias corrections into the step size :math:`\eta\sqrt{1-\beta_2^t}/(1-\beta_1^t)`; the
formula above is the same update written with the corrected moments, so :math:`\epsilon` appears
divided by :math:`\sqrt{1-\beta_2^t}`. ``sign(0) = 0`` in torch and in JAX, so a coordinate with a zero
gradient does not move (apart from weight decay).

Known difference between references: ``pytorch_optimizer.Grams`` (4.1) adds :math:`\epsilon`
*after* bias correction, :math:`|\hat m_t| / (\sqrt{\hat v_t} + \epsilon)`, which is also how
secondary summaries state the paper's algorithm (not re-checked against the PDF). That takes
larger steps in the first few hundred steps wherever :math:`\sqrt{\hat v_t}` is comparable to :math:`\epsilon`; the two coincide once
:math:`\beta_2^t \approx 0` and whenever ``correct_bias=False``. ``eps_after_bias_correction=True``
reproduces pytorch_optimizer exactly. Its ``weight_decouple=False`` mode is not offered: there it
adds :math:`\lambda\theta` to the gradient only after the update has been computed, so it has no
effect on the step.

Optax has no Grams. All reductions are element-wise, so no cross-device reduction is needed.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters


class GramsState(NamedTuple):
  """State of `scale_by_grams`: step count and Adam's first and second moments."""

  count: jax.Array  # shape=(), dtype=jnp.int32: number of steps taken.
  mu: optax.Updates
  nu: optax.Updates


def scale_by_grams(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    mu_dtype: DTypeLike | None = None,
    *,
    correct_bias: bool = True,
    eps_after_bias_correction: bool = False,
) -> optax.GradientTransformation:
  """Rescales gradients by the Grams rule (see the module docstring); no learning rate, no decay.

  Args:
    b1: Decay rate of the first moment (magnitude of the step).
    b2: Decay rate of the second moment.
    eps: Added to the denominator; where it is added is set by `eps_after_bias_correction`.
    mu_dtype: dtype of the first moment; `None` keeps the parameters' dtype.
    correct_bias: Bias-correct both moments, as the authors' `correct_bias` (default True).
    eps_after_bias_correction: False (authors, grams-pytorch): `eps` is added to the
      un-corrected `sqrt(v_t)`. True (pytorch_optimizer): added to `sqrt(v_hat_t)`.

  Returns:
    An `optax.GradientTransformation`.
  """
  check_hyperparameters("Grams", DECAY_RATE, "Typical values: b1=0.9, b2=0.999.", b1=b1, b2=b2)
  check_hyperparameters("Grams", NON_NEGATIVE, "The authors' default is 1e-6.", eps=eps)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params: optax.Params) -> GramsState:
    return GramsState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(
      updates: optax.Updates, state: GramsState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, GramsState]:
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    if correct_bias:
      mu_hat = optax.tree.bias_correction(mu, b1, count)
      nu_hat = optax.tree.bias_correction(nu, b2, count)
      eps_hat = eps if eps_after_bias_correction else eps / jnp.sqrt(1 - b2**count)
    else:
      mu_hat, nu_hat, eps_hat = mu, nu, eps

    def direction_times_magnitude(g: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
      return (jnp.sign(g) * jnp.abs(m) / (jnp.sqrt(v) + eps_hat)).astype(g.dtype)

    updates = jax.tree.map(direction_times_magnitude, updates, mu_hat, nu_hat)
    return updates, GramsState(
        count=count, mu=optax.tree.cast(mu, mu_dtype), nu=optax.tree.cast_like(nu, state.nu)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def grams(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    weight_decay: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    correct_bias: bool = True,
    eps_after_bias_correction: bool = False,
    mask: optax.Params | None = None,
) -> optax.GradientTransformation:
  """Grams with decoupled weight decay, defaults of the authors' grams-pytorch 0.0.2.

  `theta <- theta - learning_rate * (u + weight_decay * theta)` with `u` from `scale_by_grams`, as
  the authors' `p -= lr * weight_decay * p` before the Grams step. Like `optax.adamw`, `update`
  needs `params` (for the weight-decay term).

  Args:
    learning_rate: A float or an optax schedule.
    b1: Decay rate of the first moment.
    b2: Decay rate of the second moment.
    eps: Denominator constant (see `scale_by_grams` for where it is added).
    weight_decay: Decoupled weight decay, multiplied by the learning rate.
    mu_dtype: dtype of the first moment; `None` keeps the parameters' dtype.
    correct_bias: Bias-correct both moments (authors' default True).
    eps_after_bias_correction: True reproduces pytorch_optimizer's eps placement.
    mask: Tree (or callable returning one) of booleans: where to apply weight decay.

  Returns:
    An `optax.GradientTransformation`.
  """
  return optax.chain(
      scale_by_grams(
          b1, b2, eps, mu_dtype, correct_bias=correct_bias, eps_after_bias_correction=eps_after_bias_correction
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
