r"""Optimistic-AMSGrad: AMSGrad plus a step along a prediction of the next gradient.

Paper: "An Optimistic Acceleration of AMSGrad for Nonconvex Optimization" (earlier title "Optimistic
Adaptive Acceleration for Optimization"), Jun-Kun Wang, Xiaoyun Li, Belhal Karimi, Ping Li, ACML 2021,
arXiv:1903.01435.

What could be read: the paper's abstract and introduction (not its algorithm box), and the authors'
official code (GitHub ``Hintonthu/optimistic-amsgrad``: ``Optadam_torch.py`` and the training scripts
``cifar10_opt.py`` etc., whose README gives the hyperparameters of every experiment: lr 1e-3,
b1=0.9, b2=0.99, ``span=5``). The update below is transcribed from that code. Its extrapolation is
the code's (a regularized minimal polynomial extrapolation, RMPE, as in Scieur et al. 2016,
"Regularized Nonlinear Acceleration": a ridge-regularised affine combination of recent vectors),
applied here to past gradients, which is how the abstract describes the method ("mini-batch
gradients in consecutive iterations ... sequentially predictable"). Searched without finding the
algorithm box or other code: the search tool's page, code and documentation corpora (arXiv
mirrors returned the abstract and introduction only), GitHub repositories named like
``*amsgrad*`` / ``*optimistic*``, and the strings ``OptimisticAMSGrad`` / ``optimistic_amsgrad``.

With :math:`t` counted from 1, :math:`m_t` the prediction of :math:`g_t` made at step :math:`t-1`
(zero while no prediction exists), :math:`\alpha_t = \eta \sqrt{1-\beta_2^t}/(1-\beta_1^t)`:

.. math::

  h_{t+1} &= \beta_1 \theta_{t-1} + (1-\beta_1)\, m_{t+1} \qquad
  \theta_t = \beta_1 \theta_{t-1} + (1-\beta_1) g_t \\
  v_t &= \beta_2 v_{t-1} + (1-\beta_2)(g_t - m_t)^2, \qquad \hat v_t = \max(\hat v_{t-1}, v_t),
  \qquad d_t = \sqrt{\hat v_t} + \epsilon \\
  w_{t+1/2} &= w_{t-1/2} - \alpha_t\, \theta_t / d_t \qquad \text{(the AMSGrad sequence)} \\
  w_{t+1} &= w_{t+1/2} - \alpha_t\, h_{t+1} / d_t \qquad \text{(the optimistic step, where the gradient is taken)}

with :math:`w_{1/2} = w_1`. The second moment tracks the prediction error :math:`g_t - m_t`, not the
gradient: a good prediction makes the steps larger. The state keeps the offset
:math:`e_t = w_{t+1/2} - w_{t+1} = \alpha_t h_{t+1}/d_t`, so the update
:math:`w_{t+1} - w_t = e_{t-1} - \alpha_t \theta_t/d_t - e_t` needs no parameters.

Prediction (RMPE over the last ``span + 1`` gradients, per parameter tensor): with
:math:`u_i = g_{t-\text{span}+i} - g_{t-\text{span}+i-1}` for :math:`i = 1..\text{span}` and
:math:`U = [u_1, \dots, u_\text{span}]`, solve :math:`(U^\top U + \lambda I) z = \mathbf 1`, set
:math:`c = z / \mathbf 1^\top z` and predict :math:`m_{t+1} = \sum_i c_i\, g_{t-\text{span}+i}`.
For a sequence converging linearly, :math:`g_i = g^* + \rho^i b`, this is :math:`g^*` as
:math:`\lambda \to 0`. Until ``span + 1`` gradients have been seen the prediction is zero.

Deviations from the authors' code (which has no tests or package to compare against; our test is a
numpy transcription of the update above):

* Prediction. The code extrapolates the last ``span`` *iterates* with RMPE and evaluates a second
  gradient there (an auxiliary network on the same mini-batch), so it costs an extra forward and
  backward pass per step and uses that one gradient both as :math:`m_t` in :math:`v_t` and as
  :math:`m_{t+1}` in :math:`h_{t+1}`. Here the prediction is made from past gradients, as the
  abstract describes, at no extra gradient evaluation; the
  prediction entering :math:`v_t` is the one made for :math:`g_t` one step earlier.
* Warm-up. In the code the auxiliary network's weights are all zero for the first ``span`` steps
  (the prediction is then the gradient at the origin); here the prediction is zero.
* The code's history of iterates is kept in float64; here the extrapolation runs in the
  gradients' dtype (at least float32). Its ridge ``lambda = 1e-3`` (absolute, not scaled by
  :math:`\|U^\top U\|`) is the code's, exposed as ``regularization``.
* Weight decay is the code's L2 penalty on the gradient (``optax.add_decayed_weights`` first).
* AMSGrad's maximum is always on (the code's ``amsgrad=True`` default; the method is defined with it).

Memory: :math:`\theta, v, \hat v, e, m` and ``span + 1`` past gradients, ``span + 6`` copies of the
parameters (11 at the default ``span=5``). optax has no optimistic AMSGrad.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, POSITIVE, check_hyperparameters


class OptimisticAMSGradState(NamedTuple):
  """State of :func:`scale_by_optimistic_amsgrad`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # theta_t, EMA of gradients
  nu: optax.Updates  # v_t, EMA of squared prediction errors
  nu_max: optax.Updates  # running max of v_t
  offset: optax.Updates  # e_t = w_{t+1/2} - w_{t+1}, before the learning rate's sign flip
  prediction: optax.Updates  # m_{t+1}, the prediction of the next gradient
  grad_history: tuple[optax.Updates, ...]  # the last span + 1 gradients, oldest first


def _extrapolate(history: list[jax.Array], regularization: float) -> jax.Array:
  """RMPE: the combination sum_i c_i x_i (sum c = 1) of history[1:] with the smallest regularized residual."""
  dtype = jnp.promote_types(history[-1].dtype, jnp.float32)
  x = [h.astype(dtype) for h in history]
  diffs = [later - earlier for earlier, later in zip(x[:-1], x[1:])]
  k = len(diffs)
  # Entry by entry, each a fused reduction: the (k, n) x (n, k) product of a stacked copy was 4x slower
  # on XLA:CPU (and the weighted sum below likewise beats a (k,) x (k, n) product).
  dots = {(i, j): jnp.vdot(diffs[i], diffs[j]) for i in range(k) for j in range(i, k)}
  gram = jnp.stack([jnp.stack([dots[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)])
  z = jnp.linalg.solve(gram + regularization * jnp.eye(k, dtype=dtype), jnp.ones(k, dtype))
  weights = z / jnp.sum(z)
  return sum(w * v for w, v in zip(weights, x[1:])).astype(history[-1].dtype)


def scale_by_optimistic_amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    span: int = 5,
    regularization: float = 1e-3,
) -> optax.GradientTransformation:
  """Returns w_{t+1} - w_t negated (learning rate included): e_t + alpha_t theta_t / d_t - e_{t-1}.

  Args:
    learning_rate: eta, a float or an optax schedule of the step count (evaluated at the state's
      count, 0 for the first update).
    b1: decay of the gradient EMA theta_t.
    b2: decay of the EMA of squared prediction errors v_t.
    eps: added to sqrt(max v) in the denominator.
    span: number of gradient differences the extrapolation uses (it keeps span + 1 gradients).
    regularization: ridge lambda of the extrapolation's linear system.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`OptimisticAMSGradState`.
  """
  check_hyperparameters("OptimisticAMSGrad", NON_NEGATIVE, learning_rate=learning_rate, eps=eps)
  check_hyperparameters("OptimisticAMSGrad", DECAY_RATE, "Defaults: b1=0.9, b2=0.99.", b1=b1, b2=b2)
  check_hyperparameters(
      "OptimisticAMSGrad", POSITIVE, "The authors' value is 1e-3.", regularization=regularization
  )
  if isinstance(span, (int, float)) and (span < 1 or span != int(span)):
    raise ValueError(f"OptimisticAMSGrad: span must be an integer >= 1, got {span!r}. The authors use span=5.")

  def init_fn(params: optax.Params) -> OptimisticAMSGradState:
    zeros = lambda: optax.tree.zeros_like(params)
    return OptimisticAMSGradState(
        count=jnp.zeros([], jnp.int32),
        mu=zeros(),
        nu=zeros(),
        nu_max=zeros(),
        offset=zeros(),
        prediction=zeros(),
        grad_history=tuple(zeros() for _ in range(int(span) + 1)),
    )

  def update_fn(
      updates: optax.Updates, state: OptimisticAMSGradState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, OptimisticAMSGradState]:
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = numerics.safe_increment(state.count)
    t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64
    step_size = lr * jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    history = (*state.grad_history[1:], updates)
    have_history = count >= len(state.grad_history)  # span + 1 gradients; static even when span is injected

    def predict(*leaf_history):
      return jnp.where(have_history, _extrapolate(list(leaf_history), regularization), 0.0)

    prediction = jax.tree.map(predict, *history)
    error = jax.tree.map(jnp.subtract, updates, state.prediction)
    nu = optax.tree.update_moment_per_elem_norm(error, state.nu, b2, 2)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    denom = jax.tree.map(lambda v: jnp.sqrt(v) + eps, nu_max)
    optimistic = jax.tree.map(lambda m, p: b1 * m + (1.0 - b1) * p, state.mu, prediction)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    offset = jax.tree.map(lambda h, d: step_size * h / d, optimistic, denom)
    new_updates = jax.tree.map(
        lambda m, d, e, e_prev: step_size * m / d + e - e_prev, mu, denom, offset, state.offset
    )
    cast = optax.tree.cast_like
    new_state = OptimisticAMSGradState(
        count=count,
        mu=cast(mu, state.mu),
        nu=cast(nu, state.nu),
        nu_max=cast(nu_max, state.nu_max),
        offset=cast(offset, state.offset),
        prediction=cast(prediction, state.prediction),
        grad_history=tuple(cast(g, old) for g, old in zip(history, state.grad_history)),
    )
    return cast(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def optimistic_amsgrad(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    span: int = 5,
    regularization: float = 1e-3,
) -> optax.GradientTransformation:
  """Optimistic-AMSGrad with the authors' defaults (lr 1e-3, b1=0.9, b2=0.99, span=5) and L2 decay.

  Args:
    learning_rate: eta, a float or an optax schedule of the step count.
    b1, b2, eps, span, regularization: see :func:`scale_by_optimistic_amsgrad`.
    weight_decay: L2 coefficient; weight_decay * w is added to the gradient (the authors' code).

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("OptimisticAMSGrad", NON_NEGATIVE, weight_decay=weight_decay)
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      scale_by_optimistic_amsgrad(learning_rate, b1, b2, eps, span, regularization),
      optax.scale(-1.0),
  )
