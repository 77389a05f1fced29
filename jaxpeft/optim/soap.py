r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

Paper: N. Vyas, D. Morwani, R. Zhao, I. Shapira, D. Brandfonbrener, L. Janson, S. Kakade, "SOAP:
Improving and Stabilizing Shampoo using Adam", ICLR 2025, arXiv:2409.11321. Official code: the
GitHub repository nikhilvyas/SOAP (``soap.py``; not on PyPI).

Reference implementation followed: ``pytorch_optimizer.SOAP`` (4.1), a port of the official code
with the same defaults (``lr=3e-3, betas=(0.95, 0.95), shampoo_beta=b2, eps=1e-8,
weight_decay=1e-2, precondition_frequency=10, max_precondition_dim=10000``).

For a parameter with axes :math:`i = 1..k`, each axis of size :math:`d_i \le`
``max_precondition_dim`` keeps a statistic :math:`L_i \in \mathbb{R}^{d_i \times d_i}` and a basis
:math:`Q_i` (larger axes, and vectors, keep the identity).
:math:`P(X)` contracts every axis :math:`i` of :math:`X` with :math:`Q_i` (:math:`X \times_i Q_i^\top`) and
:math:`P^{-1}(X)` with :math:`Q_i^\top` (:math:`X \times_i Q_i`). With :math:`G^{(i)}` the gradient
unfolded along axis :math:`i`:

* Step 1 only fills the statistics and takes no step:
  :math:`L_i = (1-\beta_s) G^{(i)} G^{(i)\top}`, :math:`Q_i` = eigenvectors of :math:`L_i`
  by decreasing eigenvalue.
* Step :math:`t \ge 2`, with :math:`s = t - 1`:

.. math::

  m &\leftarrow \beta_1 m + (1-\beta_1) G, \qquad
  v \leftarrow \beta_2 v + (1-\beta_2) P(G)^2 \\
  \theta &\leftarrow \theta - \alpha_t \frac{\sqrt{1-\beta_2^s}}{1-\beta_1^s}
      P^{-1}\!\left(\frac{P(m)}{\sqrt{v} + \epsilon}\right), \qquad
  \theta \leftarrow (1 - \alpha_t\lambda)\,\theta \\
  L_i &\leftarrow \beta_s L_i + (1-\beta_s) G^{(i)} G^{(i)\top}, \qquad
  \text{every } f \text{ steps } (s \bmod f = 0):\ Q_i \leftarrow \mathrm{QR}(L_i Q_i \Pi_i),\
  v \leftarrow v \text{ permuted by } \Pi_i \text{ along axis } i,

where :math:`\Pi_i` sorts the columns by the estimated eigenvalues
:math:`\mathrm{diag}(Q_i^\top L_i Q_i)`, largest first (one power-iteration step). The first
moment lives in the parameter space, the second in the rotated one. Weight decay multiplies the
already-updated parameters, as in the official code (not :math:`\theta_{t-1}`).

Deviations: the reference's QR runs in float32 whatever the parameters' dtype; here it runs in
their dtype (the test switches the reference's to float64). Not implemented: the reference's
``merge_dims`` / ``data_format`` (folding small axes together before preconditioning) and
pytorch_optimizer's extra ``normalize_gradient``, and ``precondition_1d`` (a vector's
statistic has rank one at step 1, so its eigenbasis is not unique and no reference run could be
matched); an axis with more than
``max_precondition_dim`` entries is left unpreconditioned, as in the reference. Eigenvectors
are defined up to sign (and within repeated eigenvalues up to rotation); SOAP's update does not
depend on the signs, but with repeated eigenvalues (e.g. an axis longer than the product of the
others at step 1) implementations may pick different bases. optax has no SOAP.

Sharding: when the (d, d) statistics and bases are sharded along their first axis while the
parameter is replicated, XLA's sharding propagation may give the rotated-space second moment (and
the first moment) that sharding on output unless the jitted step fixes ``out_shardings`` (as
``jaxpeft.train`` does); the values are unaffected.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import (
    DECAY_RATE,
    NON_NEGATIVE,
    POSITIVE,
    check_hyperparameters,
)

# One matrix per axis, Q_i^T (eigenvectors as rows); None: the axis is not preconditioned. Stored
# transposed so that rotating back yields an axis from the basis' second (column) axis, which keeps
# a parameter's sharding when the state is sharded along its leading axes.
Bases = tuple[jax.Array | None, ...]


class SoapState(NamedTuple):
  """State of :func:`scale_by_soap`."""

  count: jax.Array  # int32 number of updates so far (the first one takes no step)
  mu: optax.Updates  # first moment, parameter space
  nu: optax.Updates  # second moment, in the rotated space
  statistics: optax.Updates  # per leaf a tuple of L_i (or None)
  bases: optax.Updates  # per leaf a tuple of Q_i^T (or None)


def _rotate(x: jax.Array, bases: Bases, back: bool = False) -> jax.Array:
  """P(x) (x times_i Q_i^T on every axis), or P^{-1}(x) with ``back``."""
  for q_transposed in bases:
    if q_transposed is None:
      x = jnp.moveaxis(x, 0, -1)
    else:
      x = jnp.tensordot(x, q_transposed, axes=(0, 0 if back else 1))
  return x


def _axis_statistic(g: jax.Array, axis: int) -> jax.Array:
  others = [i for i in range(g.ndim) if i != axis]
  return jnp.tensordot(g, g, axes=(others, others))


def _at_least_float32(x: jax.Array) -> jax.Array:
  """eigh and qr have no bfloat16/float16 kernels: such statistics are decomposed in float32."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _eigenbasis(statistic: jax.Array) -> jax.Array:
  _, vectors = jnp.linalg.eigh(_at_least_float32(statistic))
  return vectors[:, ::-1].T.astype(statistic.dtype)  # Q^T, decreasing eigenvalues


def _power_iteration(statistics: Bases, bases: Bases, nu: jax.Array) -> tuple[Bases, jax.Array]:
  """One QR power-iteration step per axis, sorted by estimated eigenvalue; nu permuted alike."""
  new_bases = []
  for axis, (statistic, q_transposed) in enumerate(zip(statistics, bases)):
    if q_transposed is None:
      new_bases.append(None)
      continue
    q = q_transposed.T
    product = statistic @ q
    order = jnp.argsort(-jnp.sum(q * product, axis=0), stable=True)
    nu = jnp.take(nu, order, axis=axis)
    new_bases.append(jnp.linalg.qr(_at_least_float32(product[:, order]))[0].T.astype(q.dtype))
  return tuple(new_bases), nu


def scale_by_soap(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    precondition_frequency: int = 10,
    max_precondition_dim: int = 10000,
    correct_bias: bool = True,
) -> optax.GradientTransformation:
  """Rescales updates to SOAP's rotated-Adam direction, before -lr (zero on the first update).

  Args:
    b1: decay of the first moment.
    b2: decay of the rotated second moment.
    shampoo_beta: decay of the Shampoo statistics L_i; None: b2.
    eps: added to sqrt(v).
    precondition_frequency: steps between the QR refreshes of the bases.
    max_precondition_dim: longer axes are not preconditioned.
    correct_bias: multiply by sqrt(1 - b2^s) / (1 - b1^s).

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`SoapState`.
  """
  check_hyperparameters("SOAP", DECAY_RATE, "Defaults: b1=b2=0.95.", b1=b1, b2=b2, shampoo_beta=shampoo_beta)
  check_hyperparameters("SOAP", NON_NEGATIVE, eps=eps)
  check_hyperparameters(
      "SOAP", POSITIVE, precondition_frequency=precondition_frequency, max_precondition_dim=max_precondition_dim
  )
  beta_s = b2 if shampoo_beta is None else shampoo_beta

  def preconditioned_axes(p: jax.Array) -> list[bool]:
    if p.ndim == 1:
      return [False]
    return [bool(d <= max_precondition_dim) for d in p.shape]

  def init_fn(params: optax.Params) -> SoapState:
    def matrices(p):
      return tuple(jnp.zeros((d, d), p.dtype) if on else None for d, on in zip(p.shape, preconditioned_axes(p)))

    return SoapState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        statistics=jax.tree.map(matrices, params),
        bases=jax.tree.map(matrices, params),
    )

  def update_fn(
      updates: optax.Updates, state: SoapState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, SoapState]:
    del params
    s = state.count  # the reference's step - 1
    t = s.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    scale = jnp.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else 1.0

    def first(g, m, v, stats, bases):
      stats = tuple(
          None if L is None else (1 - beta_s) * _axis_statistic(g, i).astype(L.dtype) for i, L in enumerate(stats)
      )
      bases = tuple(None if L is None else _eigenbasis(L) for L in stats)
      return jnp.zeros_like(g), m, v, stats, bases

    def later(g, m, v, stats, bases):
      m = (b1 * m + (1 - b1) * g).astype(m.dtype)
      v = (b2 * v + (1 - b2) * jnp.square(_rotate(g, bases))).astype(v.dtype)
      direction = (scale * _rotate(_rotate(m, bases) / (jnp.sqrt(v) + eps), bases, back=True)).astype(g.dtype)
      stats = tuple(
          None if L is None else (beta_s * L + (1 - beta_s) * _axis_statistic(g, i)).astype(L.dtype)
          for i, L in enumerate(stats)
      )
      bases, v = jax.lax.cond(
          s % precondition_frequency == 0, _power_iteration, lambda _, b, v: (b, v), stats, bases, v
      )
      return direction, m, v, stats, bases

    def per_leaf(g, m, v, stats, bases):
      return jax.lax.cond(s == 0, first, later, g, m, v, stats, bases)

    # `updates` is a prefix of the statistics and bases trees (a tuple per leaf); the result has a
    # 5-tuple per leaf of `updates`, split into five trees.
    treedef = jax.tree.structure(updates)
    parts = treedef.flatten_up_to(
        jax.tree.map(per_leaf, updates, state.mu, state.nu, state.statistics, state.bases)
    )
    direction, mu, nu, statistics, bases = (treedef.unflatten([p[k] for p in parts]) for k in range(5))
    new_state = SoapState(
        count=numerics.safe_increment(state.count),
        mu=optax.tree.cast_like(mu, state.mu),
        nu=optax.tree.cast_like(nu, state.nu),
        statistics=statistics,
        bases=bases,
    )
    return optax.tree.cast_like(direction, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


class SoapWeightDecayState(NamedTuple):
  """State of :func:`soap_weight_decay`."""

  count: jax.Array  # int32 number of updates so far (to evaluate the schedule)


def soap_weight_decay(
    learning_rate: optax.ScalarOrSchedule, weight_decay: jax.typing.ArrayLike
) -> optax.GradientTransformation:
  """SOAP's decay of the updated parameters: theta + u' = (1 - lr * weight_decay) (theta + u).

  Skips the first update, on which SOAP takes no step at all.

  Args:
    learning_rate: a float or a schedule (evaluated at the number of updates so far).
    weight_decay: the coefficient lambda.

  Returns:
    An ``optax.GradientTransformation``; it needs ``params``.
  """

  def init_fn(params: optax.Params) -> SoapWeightDecayState:
    del params
    return SoapWeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(
      updates: optax.Updates, state: SoapWeightDecayState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, SoapWeightDecayState]:
    if params is None:
      raise ValueError("SOAP's weight decay needs the parameters: call update(grads, state, params).")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    decay = jnp.where(state.count == 0, 0.0, lr * weight_decay)
    new_updates = jax.tree.map(lambda u, p: u - decay * (p + u), updates, params)
    new_state = SoapWeightDecayState(numerics.safe_increment(state.count))
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 1e-2,
    precondition_frequency: int = 10,
    max_precondition_dim: int = 10000,
    correct_bias: bool = True,
) -> optax.GradientTransformation:
  """SOAP with the official defaults; weight decay (1 - lr * weight_decay) on the updated parameters.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, shampoo_beta, eps, precondition_frequency, max_precondition_dim, correct_bias: see
      :func:`scale_by_soap`.
    weight_decay: decoupled decay coefficient lambda.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("SOAP", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      scale_by_soap(b1, b2, shampoo_beta, eps, precondition_frequency, max_precondition_dim, correct_bias),
      optax.scale_by_learning_rate(learning_rate),
      soap_weight_decay(learning_rate, weight_decay),
  )
