r"""MARS: variance-reduced (STORM-like) gradient corrections inside AdamW or Lion.

Paper: "MARS: Unleashing the Power of Variance Reduction for Training Large Models", Huizhuo
Yuan, Yifeng Liu, Shuang Wu, Xun Zhou, Quanquan Gu, ICML 2025, arXiv:2411.10438.

Reference implementation followed: the authors' official code, ``MARS/optimizers/mars.py`` in the
GitHub repository AGI-Arena/MARS (not on PyPI), in its default approximate mode (``is_approx=True``:
the previous step's gradient stands in for the gradient of the previous mini-batch at the current
point), with its defaults ``lr=3e-3, betas=(0.95, 0.99), gamma=0.025, eps=1e-8, weight_decay=0``
and, for the parameters that are not matrices, AdamW with ``lr_1d=3e-3, betas_1d=(0.9, 0.95),
weight_decay_1d=0.1``.

For a matrix (a leaf with exactly two dimensions, the authors' test; every leaf with
``optimize_1d=True``), with :math:`t` counted from 1 and :math:`g_0 = 0`:

.. math::

  c_t &= g_t + \gamma \frac{\beta_1}{1-\beta_1} (g_t - g_{t-1}), \qquad
  c_t \leftarrow c_t / \max(1, \lVert c_t \rVert_2) \quad \text{(per leaf)} \\
  m_t &= \beta_1 m_{t-1} + (1-\beta_1) c_t \\
  u_t &= \frac{m_t}{(1-\beta_1^t)\,\bigl(\sqrt{v_t / (1-\beta_2^t)} + \epsilon\bigr)}, \quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) c_t^2 \qquad \text{(MARS-AdamW)} \\
  u_t &= \operatorname{sign}(m_t) \qquad \text{(MARS-Lion, } v_t \text{ unused)} \\
  \theta_t &= \theta_{t-1} - \alpha_t (u_t + \lambda \theta_{t-1}).

Every other leaf takes an AdamW step on the raw gradient with its own betas, decay
:math:`\lambda_{1d}` and learning rate :math:`\alpha_{1d}` (the same :math:`u_t` formula with
:math:`c_t = g_t`). :func:`scale_by_mars` returns :math:`u_t`; the factory adds the decay and
applies the two learning rates with ``optax.masked``.

Where the references differ (pinned by ``tests/optim/mars_test.py``):

* Learning-rate schedules: the authors set the non-matrix lr to ``lr * lr_1d / lr0`` (a torch
  scheduler moves both); here ``lr_1d`` is its own float or schedule, as
  ``optax.inject_hyperparams`` only sees the current lr. ``lr_1d=lambda t: 3e-3 * schedule(t) /
  lr0`` reproduces the authors' run.
* ``pytorch_optimizer.MARS`` (4.1) treats every leaf with two *or more* dimensions as a matrix
  (the authors: exactly two, so conv kernels take the AdamW branch there), and places
  :math:`\epsilon` before the bias correction, :math:`(\sqrt{v_t} + \epsilon)/\sqrt{1-\beta_2^t}`
  (plus 1e-15 under the root). With those accounted for it computes the same steps.
* The authors' exact mode (``is_approx=False``, a second gradient of the previous batch at the
  current point) and their MARS-Shampoo form (a bfloat16 Newton-Schulz iteration under
  ``torch.compile``) are not offered. optax has no MARS.
"""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters

MarsType = Literal["adamw", "lion"]


class MarsState(NamedTuple):
  """State of :func:`scale_by_mars`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # EMA of the corrected gradients c_t (of g_t on non-matrix leaves)
  nu: optax.Updates  # EMA of their squares (unused by MARS-Lion on matrices)
  last_grad: optax.Updates  # the previous step's gradient g_{t-1}


def _is_matrix(x: jax.Array) -> bool:
  return jnp.ndim(x) == 2


def scale_by_mars(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.99,
    gamma: jax.typing.ArrayLike = 0.025,
    eps: jax.typing.ArrayLike = 1e-8,
    b1_1d: jax.typing.ArrayLike = 0.9,
    b2_1d: jax.typing.ArrayLike = 0.95,
    *,
    mars_type: MarsType = "adamw",
    optimize_1d: bool = False,
) -> optax.GradientTransformation:
  """Rescales updates to MARS's direction u_t (before the learning rate and decay).

  Args:
    b1: decay of the EMA of corrected gradients on matrices; also sets the correction's weight.
    b2: decay of the squared EMA on matrices (MARS-AdamW).
    gamma: strength of the variance-reduction correction g_t - g_{t-1}.
    eps: added to the bias-corrected sqrt(v_t).
    b1_1d, b2_1d: AdamW betas of the non-matrix leaves (unused with ``optimize_1d``).
    mars_type: ``"adamw"`` or ``"lion"`` (sign of the momentum) for the matrices.
    optimize_1d: apply MARS to every leaf, not only to matrices.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`MarsState`.
  """
  hint = "Defaults: b1=0.95, b2=0.99, b1_1d=0.9, b2_1d=0.95."
  check_hyperparameters("MARS", DECAY_RATE, hint, b1=b1, b2=b2, b1_1d=b1_1d, b2_1d=b2_1d)
  check_hyperparameters("MARS", NON_NEGATIVE, gamma=gamma, eps=eps)
  if mars_type not in ("adamw", "lion"):
    raise ValueError(f"MARS: mars_type must be 'adamw' or 'lion', got {mars_type!r}.")

  def init_fn(params: optax.Params) -> MarsState:
    mu, nu, last_grad = (optax.tree.zeros_like(params) for _ in range(3))
    return MarsState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, last_grad=last_grad)

  def update_fn(
      updates: optax.Updates, state: MarsState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, MarsState]:
    del params
    count = numerics.safe_increment(state.count)
    t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64

    def adam_direction(m, v, beta1, beta2):
      return m / ((jnp.sqrt(v / (1.0 - beta2**t)) + eps) * (1.0 - beta1**t))

    def leaf(g, m, v, last):
      """(direction, new m, new v) of one leaf."""
      if not (optimize_1d or _is_matrix(g)):
        m = b1_1d * m + (1.0 - b1_1d) * g
        v = b2_1d * v + (1.0 - b2_1d) * g * g
        return adam_direction(m, v, b1_1d, b2_1d), m, v
      c = g + (gamma * b1 / (1.0 - b1)) * (g - last)
      norm = jnp.sqrt(jnp.sum(c * c))
      c = jnp.where(norm > 1.0, c / norm, c)
      m = b1 * m + (1.0 - b1) * c
      if mars_type == "lion" and _is_matrix(g):
        return jnp.sign(m), m, v
      v = b2 * v + (1.0 - b2) * c * c
      return adam_direction(m, v, b1, b2), m, v

    results = jax.tree.map(leaf, updates, state.mu, state.nu, state.last_grad)
    direction, mu, nu = jax.tree.transpose(jax.tree.structure(updates), jax.tree.structure((0, 0, 0)), results)
    new_state = MarsState(
        count=count,
        mu=optax.tree.cast_like(mu, state.mu),
        nu=optax.tree.cast_like(nu, state.nu),
        last_grad=optax.tree.cast_like(updates, state.last_grad),
    )
    return optax.tree.cast_like(direction, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def mars(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.99,
    gamma: jax.typing.ArrayLike = 0.025,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    lr_1d: optax.ScalarOrSchedule = 3e-3,
    b1_1d: jax.typing.ArrayLike = 0.9,
    b2_1d: jax.typing.ArrayLike = 0.95,
    weight_decay_1d: jax.typing.ArrayLike = 0.1,
    *,
    mars_type: MarsType = "adamw",
    optimize_1d: bool = False,
) -> optax.GradientTransformation:
  """MARS-AdamW (``mars_type="lion"``: MARS-Lion) with the authors' defaults.

  Args:
    learning_rate: lr of the matrices (of every leaf with ``optimize_1d``); float or schedule.
    b1, b2, gamma, eps, b1_1d, b2_1d, mars_type, optimize_1d: see :func:`scale_by_mars`.
    weight_decay: decoupled decay of the matrices; they shrink by learning_rate * weight_decay.
    lr_1d: lr of the other leaves (float or schedule; see the module doc for schedules).
    weight_decay_1d: decoupled decay of the other leaves, scaled by lr_1d.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("MARS", NON_NEGATIVE, learning_rate=learning_rate, lr_1d=lr_1d)
  check_hyperparameters("MARS", NON_NEGATIVE, weight_decay=weight_decay, weight_decay_1d=weight_decay_1d)
  uses_mars = lambda tree: jax.tree.map(lambda x: optimize_1d or _is_matrix(x), tree)
  uses_adamw = lambda tree: jax.tree.map(lambda x: not (optimize_1d or _is_matrix(x)), tree)
  return optax.chain(
      scale_by_mars(b1, b2, gamma, eps, b1_1d, b2_1d, mars_type=mars_type, optimize_1d=optimize_1d),
      optax.masked(
          optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate)),
          uses_mars,
      ),
      optax.masked(
          optax.chain(optax.add_decayed_weights(weight_decay_1d), optax.scale_by_learning_rate(lr_1d)), uses_adamw
      ),
  )
