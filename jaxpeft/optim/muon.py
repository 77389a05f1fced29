r"""Muon: momentum orthogonalized by Newton-Schulz, with AdamW for the non-matrix parameters.

Paper / reference: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks",
2024 (blog post and the GitHub repository KellerJordan/Muon); the shape scalings of J. Liu et al.,
"Muon is Scalable for LLM Training", 2025, arXiv:2502.16982.

Reference implementation followed: ``pytorch_optimizer.Muon`` (4.1), with its defaults
(``lr=2e-2, momentum=0.95, nesterov=True, ns_steps=5``, the quintic coefficients
``(3.4445, -4.7750, 2.0315)``, and AdamW with ``lr=3e-4, betas=(0.9, 0.95), eps=1e-10`` for the
parameters Muon does not handle). Every parameter with two or more axes is a Muon matrix (the
reference's advice is to give it the hidden weights only: pass ``muon_weight_dimension_numbers``
with ``None`` leaves to send others to AdamW); the rest go to AdamW.

For a matrix parameter with Flax layout (fan-in axes first, fan-out last), viewed as
:math:`G \in \mathbb{R}^{n_{in} \times n_{out}}`:

.. math::

  B_t &= \beta B_{t-1} + (1-\beta) G_t, \qquad
  U_t = \begin{cases} (1-\beta) G_t + \beta B_t & \text{nesterov} \\ B_t & \text{otherwise}\end{cases} \\
  X_0 &= U_t / \max(\|U_t\|_F, \epsilon), \qquad
  X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \quad A_k = X_k X_k^\top
  \quad (\text{on the wide orientation, } k < \text{ns\_steps}) \\
  \theta_t &= \theta_{t-1} - \alpha_t \lambda \theta_{t-1}
      - \alpha_t \, s \, X_{\text{ns\_steps}}, \qquad
  s = \sqrt{\max(1, n_{out}/n_{in})} \ \ \text{or, with consistent\_rms}=r,\ r\sqrt{\max(n_{in}, n_{out})}.

The momentum has no bias correction. The reference's ``use_adjusted_lr=True`` (Moonlight) is
``consistent_rms=0.2`` here, optax's name for it.

Reused from optax: ``optax.contrib``'s Newton-Schulz orthogonalization (with its reshape of
N-d weights by ``MuonDimensionNumbers``) and its shape scaling, ``optax.adamw`` for the other
parameters, ``optax.partition``. Not reused: ``optax.contrib.muon`` itself, which differs from
the reference in three ways: it bias-corrects the momentum, its AdamW part uses Nesterov momentum
(NAdam) and Muon's ``eps``, and it defaults to Adam's ``b2=0.999`` and Muon's learning rate.

Deviations from the reference:

* The normalization divides by :math:`\|U\|_F + \epsilon` (optax) instead of
  :math:`\max(\|U\|_F, \epsilon)`; they agree to a relative :math:`\epsilon/\|U\|_F` (tested).
* The reference runs the Newton-Schulz iteration in bfloat16 whatever the parameters' dtype;
  here it runs in the parameters' dtype. ``tests/optim/muon_test.py`` compares in float64 with the
  reference's iteration dtype switched to float64 (and separately checks a float32 run against the
  reference's bfloat16 one, to bfloat16 accuracy).
* Layouts: the reference reads a weight as (out, in, ...) (PyTorch); here the last axis is the
  output (Flax), so the width scaling uses the right fan-out for Flax kernels.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib._muon import MuonDimensionNumbers, orthogonalize_via_newton_schulz, scale_by_shape

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters

KELLER_JORDAN_COEFFS = (3.4445, -4.7750, 2.0315)
DimensionNumbers = Callable[[optax.Params], Any] | Any


class MuonState(NamedTuple):
  """State of :func:`scale_by_muon`."""

  momentum: optax.Updates  # B_t, no bias correction


def flax_dimension_numbers(params: optax.Params) -> Any:
  """Muon dimension numbers for a Flax param tree: last axis = output, the others = input; None if ndim < 2."""
  return jax.tree.map(
      lambda x: MuonDimensionNumbers(tuple(range(x.ndim - 1)), x.ndim - 1) if jnp.ndim(x) >= 2 else None, params
  )


def scale_by_muon(
    beta: jax.typing.ArrayLike = 0.95,
    nesterov: bool = True,
    ns_coeffs: tuple[float, float, float] | tuple[tuple[float, float, float], ...] = KELLER_JORDAN_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-7,
    consistent_rms: jax.typing.ArrayLike | None = None,
    weight_dimension_numbers: DimensionNumbers | None = None,
) -> optax.GradientTransformation:
  """Rescales matrix updates to Muon's shape-scaled orthogonalized momentum, before -lr.

  Every leaf it sees must have two or more axes (use :func:`muon` to route the others to AdamW).

  Args:
    beta: momentum decay.
    nesterov: orthogonalize (1 - beta) g + beta B instead of B.
    ns_coeffs: the quintic's (a, b, c), or one triple per iteration.
    ns_steps: number of Newton-Schulz iterations (ignored with one triple per iteration).
    eps: floor of the Frobenius norm in the normalization.
    consistent_rms: None: scale by sqrt(max(1, fan_out / fan_in)); r: by r * sqrt(max(fan_in, fan_out)).
    weight_dimension_numbers: tree of ``optax.contrib.MuonDimensionNumbers`` (or a function of the
      params giving one); default :func:`flax_dimension_numbers`.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`MuonState`.
  """
  check_hyperparameters("Muon", DECAY_RATE, "Default: beta=0.95.", beta=beta)
  check_hyperparameters("Muon", NON_NEGATIVE, eps=eps)
  dimension_numbers = weight_dimension_numbers or flax_dimension_numbers

  def resolve(tree: optax.Updates) -> Any:
    return dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers

  def init_fn(params: optax.Params) -> MuonState:
    return MuonState(momentum=optax.tree.zeros_like(params))

  def update_fn(
      updates: optax.Updates, state: MuonState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, MuonState]:
    del params
    momentum = optax.tree.update_moment(updates, state.momentum, beta, 1)
    if nesterov:
      direction = jax.tree.map(lambda g, b: (1 - beta) * g + beta * b, updates, momentum)
    else:
      direction = momentum
    coeffs = jnp.asarray(ns_coeffs)  # here, not at construction: float64 under x64
    orthogonal = jax.tree.map(
        lambda u, dims: orthogonalize_via_newton_schulz(u, coeffs, ns_steps, "frobenius", eps, dims),
        direction,
        resolve(updates),
        is_leaf=lambda x: isinstance(x, MuonDimensionNumbers),
    )
    scaled, _ = scale_by_shape(resolve(updates), consistent_rms).update(orthogonal, None)
    new_state = MuonState(momentum=optax.tree.cast_like(momentum, state.momentum))
    return optax.tree.cast_like(scaled, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule = 2e-2,
    beta: jax.typing.ArrayLike = 0.95,
    nesterov: bool = True,
    ns_coeffs: tuple[float, float, float] | tuple[tuple[float, float, float], ...] = KELLER_JORDAN_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-7,
    weight_decay: jax.typing.ArrayLike = 0.0,
    consistent_rms: jax.typing.ArrayLike | None = None,
    adam_learning_rate: optax.ScalarOrSchedule = 3e-4,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.95,
    adam_eps: jax.typing.ArrayLike = 1e-10,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    muon_weight_dimension_numbers: DimensionNumbers | None = None,
) -> optax.GradientTransformation:
  """Muon on the matrix parameters and AdamW on the others, with pytorch_optimizer.Muon's defaults.

  Args:
    learning_rate: Muon's learning rate (float or schedule).
    beta, nesterov, ns_coeffs, ns_steps, eps, consistent_rms: see :func:`scale_by_muon`.
    weight_decay: decoupled decay of the Muon parameters (they shrink by lr * weight_decay).
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay: ``optax.adamw``'s for the others.
    muon_weight_dimension_numbers: which leaves are Muon matrices and how they fold: a tree (or a
      function of the params giving one) of ``optax.contrib.MuonDimensionNumbers``, None leaves going
      to AdamW; default :func:`flax_dimension_numbers` (every leaf with two or more axes).

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters(
      "Muon",
      NON_NEGATIVE,
      learning_rate=learning_rate,
      weight_decay=weight_decay,
      adam_learning_rate=adam_learning_rate,
      adam_weight_decay=adam_weight_decay,
  )
  dimension_numbers = muon_weight_dimension_numbers or flax_dimension_numbers

  def resolve(params: optax.Params) -> Any:
    return dimension_numbers(params) if callable(dimension_numbers) else dimension_numbers

  def labels(params: optax.Params) -> Any:
    return jax.tree.map(
        lambda dims, _: "adam" if dims is None else "muon",
        resolve(params),
        params,
        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers),
    )

  def muon_dimension_numbers(updates: optax.Updates) -> Any:
    # optax.partition hands the Muon branch a tree whose AdamW leaves are MaskedNodes: mask those.
    return jax.tree.map(
        lambda dims, u: u if isinstance(u, optax.MaskedNode) else dims,
        resolve(updates),
        updates,
        is_leaf=lambda x: x is None or isinstance(x, (MuonDimensionNumbers, optax.MaskedNode)),
    )

  return optax.partition(
      {
          "muon": optax.chain(
              scale_by_muon(beta, nesterov, ns_coeffs, ns_steps, eps, consistent_rms, muon_dimension_numbers),
              optax.add_decayed_weights(weight_decay),
              optax.scale_by_learning_rate(learning_rate),
          ),
          "adam": optax.adamw(adam_learning_rate, adam_b1, adam_b2, adam_eps, weight_decay=adam_weight_decay),
      },
      labels,
  )
