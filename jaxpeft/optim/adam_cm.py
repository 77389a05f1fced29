r"""Adam with critical momenta: a small buffer of large-gradient-norm momenta added to Adam's first moment.

Paper: P. Malviya, G. Mordido, A. Baratin, R. B. Harikandeh, J. Huang, S. Lacoste-Julien,
R. Pascanu, S. Chandar, "Promoting Exploration in Memory-Augmented Adam using Critical Momenta",
TMLR 2024, arXiv:2307.09638. Reference implementation followed: the authors' ``Adam_CM`` in
``cmoptimizer/optim.py`` of the GitHub repository chandar-lab/CMOptimizer (not on PyPI), with its
defaults ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, decay=0.7, topC=5, weight_decay=0`` and its
default modes ``synced=True, critical_test=0.0, kappa=1.0, amsgrad=False``.

A buffer holds up to :math:`C` (``topc``) momenta :math:`c_j` with priorities :math:`k_j`. With
:math:`n_t = \sum_{\text{leaves}} \|g_t\|_2` (the sum of per-tensor norms, one value for the whole
tree), for :math:`t = 1, 2, \ldots`:

* :math:`t = 1`: the buffer receives :math:`(n_1, g_1)`; no step is taken (the first moment is
  still zero).
* :math:`t > 1`:

.. math::

  m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
  \tilde m_t = m_t + \frac{1}{|\mathcal{B}|}\sum_{j \in \mathcal{B}} c_j
  \quad (\text{the buffer before this step's insertion}) \\
  &\text{insert } (n_t, m_t) \text{ if the buffer is not full, else replace the lowest-priority entry if }
  n_t > \min_j k_j \\
  v_t &= \beta_2 v_{t-1} + (1-\beta_2)\tilde m_t^2, \qquad
  \theta_t = \theta_{t-1} - \alpha\lambda\theta_{t-1}
      - \alpha \frac{\tilde m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

and after every step all priorities decay: :math:`k_j \leftarrow \text{decay} \cdot k_j`. The
second moment is of :math:`\tilde m_t`, not of the gradient, as in the authors' code.

The buffer costs ``topc`` extra copies of the parameters. The authors' other modes
(``synced=False``: per-tensor norms and buffers; ``critical_test>0``: random FIFO replacement;
``kappa=0``; ``amsgrad``) are not implemented. optax and pytorch_optimizer (4.1) have no AdamCM.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, POSITIVE, check_hyperparameters


class AdamCMState(NamedTuple):
  """State of :func:`scale_by_adam_cm`."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # m_t
  nu: optax.Updates  # v_t, of the aggregated first moment
  buffer: tuple[optax.Updates, ...]  # topc param-shaped trees: the critical momenta (zeros where empty)
  priorities: jax.Array  # (topc,) priorities k_j, shared by every leaf
  size: jax.Array  # int32 number of filled buffer slots


def scale_by_adam_cm(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    decay: jax.typing.ArrayLike = 0.7,
    topc: int = 5,
) -> optax.GradientTransformation:
  """Rescales updates to Adam's direction with the critical-momenta aggregate, before -lr.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the bias-corrected sqrt(v).
    decay: per-step decay of the buffer priorities (the authors' ``decay``).
    topc: buffer capacity (the authors' ``topC``).

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`AdamCMState`.
  """
  check_hyperparameters("AdamCM", DECAY_RATE, "Defaults: b1=0.9, b2=0.999, decay=0.7.", b1=b1, b2=b2, decay=decay)
  check_hyperparameters("AdamCM", NON_NEGATIVE, eps=eps)
  check_hyperparameters("AdamCM", POSITIVE, topc=topc)

  def init_fn(params: optax.Params) -> AdamCMState:
    dtype = jnp.result_type(*jax.tree.leaves(params)) if jax.tree.leaves(params) else jnp.float32
    return AdamCMState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        buffer=tuple(optax.tree.zeros_like(params) for _ in range(topc)),
        priorities=jnp.zeros([topc], dtype),  # in the parameters' dtype, like the state's other floats
        size=jnp.zeros([], jnp.int32),
    )

  def update_fn(
      updates: optax.Updates, state: AdamCMState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, AdamCMState]:
    del params
    count = numerics.safe_increment(state.count)
    first = state.count == 0
    norm = sum(jnp.linalg.norm(g) for g in jax.tree.leaves(updates))  # sum of per-leaf norms (synced)
    mu = jax.tree.map(lambda m, g: jnp.where(first, m, b1 * m + (1 - b1) * g), state.mu, updates)
    capacity = len(state.buffer)  # topc, static even when topc is injected
    size = jnp.maximum(state.size, 1)
    aggregate = jax.tree.map(lambda m, *c: m + sum(c) / size.astype(m.dtype), mu, *state.buffer)
    full = state.size == capacity
    slot = jnp.where(full, jnp.argmin(state.priorities), state.size)
    insert = jnp.logical_not(full) | (norm > jnp.min(state.priorities))
    entry = jax.tree.map(lambda m, g: jnp.where(first, g, m), mu, updates)  # step 1 stores g_1
    buffer = tuple(
        jax.tree.map(lambda c, e, j=j: jnp.where(insert & (slot == j), e.astype(c.dtype), c), slot_tree, entry)
        for j, slot_tree in enumerate(state.buffer)
    )
    priorities = jnp.where(insert, state.priorities.at[slot].set(norm), state.priorities) * decay
    new_size = jnp.where(insert, jnp.minimum(state.size + 1, capacity), state.size)
    nu = jax.tree.map(lambda v, a: jnp.where(first, v, b2 * v + (1 - b2) * a * a), state.nu, aggregate)
    t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    direction = jax.tree.map(
        lambda a, v: jnp.where(first, 0.0, a / (1 - b1**t) / (jnp.sqrt(v) / jnp.sqrt(1 - b2**t) + eps)),
        aggregate,
        nu,
    )
    new_state = AdamCMState(
        count=count,
        mu=optax.tree.cast_like(mu, state.mu),
        nu=optax.tree.cast_like(nu, state.nu),
        buffer=buffer,
        priorities=priorities.astype(state.priorities.dtype),
        size=new_size.astype(jnp.int32),
    )
    return optax.tree.cast_like(direction, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adam_cm(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    decay: jax.typing.ArrayLike = 0.7,
    topc: int = 5,
    weight_decay: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  """Adam with critical momenta, the authors' defaults and decoupled weight decay (lr * weight_decay * theta).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, eps, decay, topc: see :func:`scale_by_adam_cm`.
    weight_decay: decoupled decay coefficient lambda (applied on every step, the first included).

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("AdamCM", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      scale_by_adam_cm(b1, b2, eps, decay, topc),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
