r"""ADOPT: Adam that normalises the gradient by the *previous* second moment, then averages it.

Paper: "ADOPT: Modified Adam Can Converge with Any beta_2 with the Optimal Rate", Shohei
Taniguchi, Keno Harada, Gouki Minegishi, Yuta Oshima, Seong Cheol Jeong, Go Nagahara, Tomoshi
Iiyama, Masahiro Suzuki, Yusuke Iwasawa, Yutaka Matsuo, NeurIPS 2024, arXiv:2411.02853.

Reference implementation followed: the authors' PyPI package ``torch-adopt`` 0.1.0 (import name
``adopt``, class ``ADOPT``), including its defaults ``b1=0.9``, ``b2=0.9999``, ``eps=1e-6``,
``clip_lambda=step**0.25``, ``decouple=False``.

With :math:`k = 0, 1, \dots` the number of earlier updates and :math:`c(k)` the clip schedule:

.. math::

  k = 0:&\quad v_0 = g_0^2,\ m_0 = 0,\ \theta \text{ unchanged (no decay either)} \\
  k \ge 1:&\quad \tilde g_k = \operatorname{clip}\!\big(g_k / \max(\sqrt{v_{k-1}}, \epsilon),
      \ -c(k),\ c(k)\big) \\
  & \quad m_k = \beta_1 m_{k-1} + (1-\beta_1) \tilde g_k, \qquad
      \theta_k = \theta_{k-1} - \alpha_k m_k - \alpha_k \lambda \theta_{k-1}\ [\text{decouple}] \\
  & \quad v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2

where :math:`g_k` includes :math:`\lambda\theta_{k-1}` when ``decouple=False`` (L2 penalty).

Where the references differ (each difference is pinned by a test in ``tests/optim/adopt_test.py``):

* ``pytorch_optimizer.ADOPT`` counts steps from 1 and calls ``clip_lambda`` with that count, so
  its clip runs one step ahead: it clips the k-th normalised gradient at :math:`(k+1)^{1/4}`
  where the authors (and optax) use :math:`k^{1/4}`. ``clip_lambda=lambda k: (k + 1) ** 0.25``
  here reproduces it. With ``weight_decouple=True`` it also decays the weights on the very first
  call, which the authors skip; it calls the switch ``weight_decouple`` (authors: ``decouple``).
* ``optax.contrib.adopt`` equals ours without weight decay (it has none; ours offers the authors'
  L2 and decoupled decay). It calls the schedule ``clip_value_fn`` plus ``use_clipping``, adds a
  ``nesterov`` option the authors lack, and under ``optax.inject_hyperparams`` its default clip
  function is mistaken for a schedule of the hyperparameter; ours accepts exactly that: a
  ``clip_lambda`` that is a number is used as the clip value of the current step.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters


class AdoptState(NamedTuple):
  """State of :func:`scale_by_adopt`."""

  count: jax.Array  # int32 number of updates so far, k
  mu: optax.Updates  # EMA of clipped normalised gradients, m_k
  nu: optax.Updates  # EMA of squared gradients, v_k


def _default_clip(step: jax.Array) -> jax.Array:
  return step**0.25


def scale_by_adopt(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.9999,
    eps: jax.typing.ArrayLike = 1e-6,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    clip_lambda: Callable[[jax.Array], jax.Array] | jax.typing.ArrayLike | None = _default_clip,
) -> optax.GradientTransformation:
  """Rescales updates according to ADOPT (the direction m_k, before -lr).

  Args:
    b1: decay of the EMA of normalised gradients m_k.
    b2: decay of the squared-gradient EMA v_k.
    eps: lower bound on sqrt(v_{k-1}) in the normalisation.
    mu_dtype: dtype of m_k in the state; ``None`` uses the parameters' dtype.
    clip_lambda: clip value c(k) as a function of the number k of earlier updates (the
      authors' ``clip_lambda``, default k**0.25), a number (the clip value of this step, as
      ``optax.inject_hyperparams`` passes an evaluated schedule), or ``None`` for no clipping.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`AdoptState`.
  """
  check_hyperparameters("ADOPT", DECAY_RATE, "Defaults: b1=0.9, b2=0.9999, eps=1e-6.", b1=b1, b2=b2)
  check_hyperparameters("ADOPT", NON_NEGATIVE, eps=eps)

  def init_fn(params: optax.Params) -> AdoptState:
    return AdoptState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(
      updates: optax.Updates, state: AdoptState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, AdoptState]:
    del params
    first = state.count == 0

    def normalise(g, v):
      normed = g / jnp.maximum(jnp.sqrt(v), eps)
      if clip_lambda is None:
        return normed
      clip = clip_lambda(state.count) if callable(clip_lambda) else clip_lambda
      return jnp.clip(normed, -clip, clip)

    normed = jax.tree.map(normalise, updates, state.nu)
    mu = jax.tree.map(
        lambda m, new: jnp.where(first, m, new),
        state.mu,
        optax.tree.update_moment(normed, state.mu, b1, 1),
    )
    # On the first step v_0 = g_0**2 (decay 0); afterwards the usual EMA.
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, jnp.where(first, 0.0, b2), 2)
    new_state = AdoptState(
        count=numerics.safe_increment(state.count),
        mu=optax.tree.cast_like(mu, state.mu),
        nu=optax.tree.cast_like(nu, state.nu),
    )
    return optax.tree.cast_like(mu, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adopt(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.9999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    clip_lambda: Callable[[jax.Array], jax.Array] | jax.typing.ArrayLike | None = _default_clip,
    decouple: bool = False,
) -> optax.GradientTransformation:
  """ADOPT with the authors' defaults and optional weight decay; see the module doc.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, eps, mu_dtype, clip_lambda: see :func:`scale_by_adopt`.
    weight_decay: decay coefficient lambda.
    decouple: decay the weights by lr * lambda * theta (from the second step on, as the
      authors) instead of adding lambda * theta to the gradient.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("ADOPT", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  core = scale_by_adopt(b1, b2, eps, mu_dtype, clip_lambda=clip_lambda)
  lr = optax.scale_by_learning_rate(learning_rate)
  if not decouple:
    return optax.chain(optax.add_decayed_weights(weight_decay), core, lr)

  def decay(count: jax.Array) -> jax.Array:
    # The first step only initialises v_0 and leaves the weights alone, decay included.
    return jnp.where(count > 0, weight_decay, 0.0)

  return optax.chain(core, optax.add_decayed_weights(decay), lr)
