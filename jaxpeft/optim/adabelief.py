r"""AdaBelief: Adam whose step size follows the belief in the observed gradient.

Paper: "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
Juntang Zhuang, Tommy Tang, Yifan Ding, Sekhar Tatikonda, Nicha Dvornek, Xenophon Papademetris,
James S. Duncan, NeurIPS 2020, arXiv:2010.07468.

Reference implementation followed: the authors' PyPI package ``adabelief-pytorch`` 0.2.1
(``adabelief_pytorch.AdaBelief``), including its defaults ``eps=1e-16``, ``weight_decouple=True``,
``fixed_decay=False``, ``rectify=True``, ``degenerated_to_sgd=True``, ``amsgrad=False``.

With gradient :math:`g_t` (plus :math:`\lambda\theta_{t-1}` when ``weight_decouple=False``) and
:math:`t` counted from 1:

.. math::

  m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
  s_t &= \beta_2 s_{t-1} + (1-\beta_2) (g_t - m_t)^2 + \epsilon
      \qquad (\epsilon \text{ accumulates in the state, as in the authors' code}) \\
  \hat s_t &= \max(\hat s_{t-1}, s_t) \text{ if amsgrad else } s_t

Without rectification the step direction is
:math:`u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{\hat s_t/(1-\beta_2^t)} + \epsilon}`.
With ``rectify=True`` (RAdam's variance rectification) let
:math:`\rho_\infty = 2/(1-\beta_2) - 1`, :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)` and

.. math::

  r_t = \sqrt{(1-\beta_2^t)\,\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}},
  \qquad
  u_t = \begin{cases}
     r_t \frac{m_t/(1-\beta_1^t)}{\sqrt{s_t} + \epsilon} & \rho_t \ge 5 \\
     m_t/(1-\beta_1^t) & \rho_t < 5 \text{ and degenerated\_to\_sgd} \\
     0 & \text{otherwise.}
  \end{cases}

The parameter update is :math:`\theta_t = \theta_{t-1} - \alpha_t u_t - d_t \theta_{t-1}` with
decoupled decay :math:`d_t = \alpha_t\lambda` (``weight_decouple=True``), :math:`d_t = \lambda`
(additionally ``fixed_decay=True``) or :math:`d_t = 0` (L2 penalty added to the gradient instead).

Where the references differ (each difference is pinned by a test in
``tests/optim/adabelief_test.py``):

* ``pytorch_optimizer.AdaBelief`` defaults to ``rectify=False`` (the authors: ``True``) and calls
  the AMSGrad switch ``ams_bound``. With ``amsgrad`` *and* ``rectify`` the two disagree: the
  authors keep the running maximum but never use it (the rectified step divides by
  :math:`\sqrt{s_t}`, the warm-up step by nothing), so the switch is a silent no-op, while
  pytorch_optimizer divides the rectified step by :math:`\sqrt{\max_\tau s_\tau}`. Rather than
  pick one silently, that combination is an error here; use ``rectify=False`` for AMSGrad.
  All other settings agree with both packages.
* ``optax.adabelief`` (0.2.8) adds ``eps_root`` to the state after the moving average exactly as
  the authors add ``eps``, so ``optax.adabelief(lr, b1, b2, eps, eps_root=eps)`` equals ours with
  ``rectify=False``. It has no rectification (the authors' default), AMSGrad or weight decay, which
  is why this module exists. Note that the accumulated :math:`\epsilon` is *not* negligible for
  tiny gradients: after bias correction it contributes :math:`\epsilon/(1-\beta_2)` to
  :math:`\hat s_t` (1e-13 with the defaults), unlike an :math:`\epsilon` added once under the root.
* The authors' ``fixed_decay`` is silently ignored without ``weight_decouple``; here that
  combination is an error too.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters

# The authors switch from the SGD-like warm-up to the rectified update once rho_t reaches 5.
_RHO_THRESHOLD = 5.0


class AdaBeliefState(NamedTuple):
  """State of :func:`scale_by_adabelief`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # EMA of gradients, m_t
  nu: optax.Updates  # EMA of squared prediction errors plus accumulated eps, s_t
  nu_max: optax.Updates | None  # running max of s_t (amsgrad only, else None)


def _rectification(b2: jax.typing.ArrayLike, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """RAdam's (rho_t, r_t) with r_t including sqrt(1 - b2**t), as the authors compute it."""
  b2_t = b2**t
  rho_inf = 2.0 / (1.0 - b2) - 1.0
  rho_t = rho_inf - 2.0 * t * b2_t / (1.0 - b2_t)
  ratio = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
  # Only used where rho_t >= 5, where the ratio is positive; clamp so the other branch is not NaN.
  r_t = jnp.sqrt((1.0 - b2_t) * jnp.maximum(ratio, 0.0))
  return rho_t, r_t


def scale_by_adabelief(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-16,
    *,
    amsgrad: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
) -> optax.GradientTransformation:
  """Rescales updates by AdaBelief's belief in the gradient (the direction u_t, before -lr).

  Args:
    b1: decay of the gradient EMA m_t.
    b2: decay of the EMA s_t of squared prediction errors (g_t - m_t)^2.
    eps: added to s_t at every step (it accumulates in the state) and to the denominator.
    amsgrad: divide by the running maximum of s_t (authors' ``amsgrad``; pytorch_optimizer's
      ``ams_bound``); needs ``rectify=False``, see the module doc.
    rectify: RAdam-style rectification of the adaptive step (authors' default: on).
    degenerated_to_sgd: with ``rectify``, take the bias-corrected momentum step while rho_t < 5;
      if False, leave the parameters unchanged during those first steps.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`AdaBeliefState`.
  """
  check_hyperparameters("AdaBelief", DECAY_RATE, "Defaults: b1=0.9, b2=0.999, eps=1e-16.", b1=b1, b2=b2)
  check_hyperparameters("AdaBelief", NON_NEGATIVE, eps=eps)
  if amsgrad and rectify:
    raise ValueError(
        "adabelief: amsgrad=True has no effect with rectify=True in the authors' "
        "adabelief-pytorch (and a different one in pytorch_optimizer); pass rectify=False "
        "to use AMSGrad, or amsgrad=False for the rectified update."
    )

  def init_fn(params: optax.Params) -> AdaBeliefState:
    return AdaBeliefState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        nu_max=optax.tree.zeros_like(params) if amsgrad else None,
    )

  def update_fn(
      updates: optax.Updates, state: AdaBeliefState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, AdaBeliefState]:
    del params
    count = numerics.safe_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    residual = optax.tree.sub(updates, mu)
    nu = optax.tree.update_moment_per_elem_norm(residual, state.nu, b2, 2)
    nu = jax.tree.map(lambda v: v + eps, nu)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else None
    mu_hat = optax.tree.bias_correction(mu, b1, count)

    if rectify:
      t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64
      rho_t, r_t = _rectification(b2, t)

      def direction(m_hat, v):
        warmup = m_hat if degenerated_to_sgd else jnp.zeros_like(m_hat)
        return jnp.where(rho_t >= _RHO_THRESHOLD, r_t * m_hat / (jnp.sqrt(v) + eps), warmup)

      new_updates = jax.tree.map(direction, mu_hat, nu)
    else:
      nu_hat = optax.tree.bias_correction(nu_max if amsgrad else nu, b2, count)
      new_updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)

    new_state = AdaBeliefState(
        count=count,
        mu=optax.tree.cast_like(mu, state.mu),
        nu=optax.tree.cast_like(nu, state.nu),
        nu_max=optax.tree.cast_like(nu_max, state.nu_max) if amsgrad else None,
    )
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adabelief(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-16,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    amsgrad: bool = False,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
) -> optax.GradientTransformation:
  """AdaBelief with the authors' defaults (rectified, decoupled weight decay); see the module doc.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, eps, amsgrad, rectify, degenerated_to_sgd: see :func:`scale_by_adabelief`.
    weight_decay: decay coefficient lambda.
    weight_decouple: decay the weights directly (AdamW style) instead of adding lambda * theta
      to the gradient.
    fixed_decay: with ``weight_decouple``, decay by lambda * theta instead of lr * lambda * theta.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("AdaBelief", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  if fixed_decay and not weight_decouple:
    raise ValueError(
        "adabelief: fixed_decay=True only applies to decoupled weight decay; set "
        "weight_decouple=True, or fixed_decay=False for an L2 penalty on the gradient."
    )
  core = scale_by_adabelief(b1, b2, eps, amsgrad=amsgrad, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd)
  lr = optax.scale_by_learning_rate(learning_rate)
  if not weight_decouple:
    return optax.chain(optax.add_decayed_weights(weight_decay), core, lr)
  if fixed_decay:
    # Added after the -lr scaling, so the sign is flipped here: update -= weight_decay * params.
    return optax.chain(core, lr, optax.add_decayed_weights(-weight_decay))
  return optax.chain(core, optax.add_decayed_weights(weight_decay), lr)
