r"""COSMOS: SOAP-like adaptivity on a tracked low-rank subspace, Muon on the rest (matrices); Adam otherwise.

Paper: L. Liu, Z. Xu, Z. Zhang, H. Kang, Z. Li, C. Liang, W. Chen, T. Zhao, "COSMOS: A Hybrid
Adaptive Optimizer for Memory-Efficient Training of LLMs", 2025, arXiv:2502.17410. The paper's
full text was not read here; this module follows the official (preliminary) code, the class
``COSMOS`` in ``COSMOS_optim.py`` of the GitHub repository lliu606/COSMOS (not on PyPI), with its
defaults ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, lr_ratio=0.1, rank=64, weight_decay=0``.

For a 2-D parameter, read in PyTorch layout :math:`G \in \mathbb{R}^{m \times n}` (m = outputs,
n = inputs: the transpose of a Flax kernel), with :math:`r = \min(\text{rank}, n)`,
:math:`c_1 = (1-\beta_1^t)/(1-\beta_1)`, :math:`c_2 = 1-\beta_2^t`:

.. math::

  M_t &= \beta_1 M_{t-1} + G_t \\
  t = 1:&\ P = \text{top-}r\text{ eigenvectors of } G^\top G,\quad S = (1-\beta_2) P^\top G^\top G P \\
  t > 1:&\ P = \mathrm{QR}(\beta_2 P_{-} S_{-} + (1-\beta_2) G^\top G P_{-}),\quad
      T = P_{-}^\top P,\quad S = \beta_2 T^\top S_{-} T + (1-\beta_2) (GP)^\top (GP) \\
  V_t &= \beta_2 V_{t-1} + (1-\beta_2) (G P)^2, \qquad
  \hat G = (G + \beta_1 M_t) / (1 + \beta_1 c_1) \\
  A &= \left[\hat G P / (\sqrt{V_t / c_2} + \epsilon)\right] P^\top, \qquad
  B = \mathrm{NS}_5(\hat G - \hat G P P^\top), \quad B \leftarrow B / (\|B\|_F + \epsilon) \\
  D &= A + 0.2\sqrt{mn}\, B, \qquad
  \theta_t = (1 - \alpha\lambda)\theta_{t-1} - \alpha\, \rho \sqrt{mn}\, D / (\|D\|_F + \epsilon)

(:math:`\rho` = ``lr_ratio``; :math:`\mathrm{NS}_5` the quintic Newton-Schulz of Muon, 5 steps, its
input divided by :math:`\|\cdot\|_F + 10^{-7}`: optax.contrib's, reused). Matrices with more than
10000 outputs, and all other parameters, take AdamW (bias-corrected, :math:`\epsilon` outside the
root, decay :math:`(1-\alpha\lambda)` first).

Deviations: the official code runs the Newton-Schulz iteration in bfloat16; here it runs in the
parameters' dtype (the test's float64 transcription does too). Its Adam branch hard-codes 0.9
and 0.1 for the first moment and its bias correction instead of ``b1``; here ``b1`` is used
(identical at the default b1=0.9). ``amsgrad`` is not implemented. With ``rank`` larger than n the
official code fails (its state has ``rank`` columns); here the rank is capped at n. optax and
pytorch_optimizer (4.1) have no COSMOS.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics
from optax.contrib._muon import orthogonalize_via_newton_schulz

from jaxpeft.optim.muon import KELLER_JORDAN_COEFFS
from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, POSITIVE, check_hyperparameters

MAX_OUTPUTS = 10000  # the official code's limit on m for the low-rank + Muon treatment
NEWTON_SCHULZ_EPS = 1e-7


class CosmosState(NamedTuple):
  """State of :func:`scale_by_cosmos` (basis and gram are None for the AdamW leaves)."""

  count: jax.Array  # int32 number of updates so far
  mu: optax.Updates  # M_t (matrices: sum with decay b1) or Adam's first moment
  nu: optax.Updates  # V_t, (m, r) for matrices, param-shaped otherwise
  basis: optax.Updates  # P, (n, r)
  gram: optax.Updates  # S, (r, r)


def _is_cosmos_matrix(p: jax.Array) -> bool:
  return p.ndim == 2 and p.shape[1] <= MAX_OUTPUTS


def _at_least_float32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def scale_by_cosmos(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    lr_ratio: jax.typing.ArrayLike = 0.1,
    rank: int = 64,
) -> optax.GradientTransformation:
  """Rescales updates to COSMOS's direction (matrices) or Adam's (others), before -lr.

  Args:
    b1: decay of the first moment.
    b2: decay of the projected second moment, the subspace statistics and Adam's second moment.
    eps: in the denominators.
    lr_ratio: factor of the matrices' step relative to the learning rate.
    rank: dimension r of the tracked subspace (capped at the number of inputs).

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`CosmosState`.
  """
  check_hyperparameters("COSMOS", DECAY_RATE, "Defaults: b1=0.9, b2=0.999.", b1=b1, b2=b2)
  check_hyperparameters("COSMOS", NON_NEGATIVE, eps=eps, lr_ratio=lr_ratio)
  check_hyperparameters("COSMOS", POSITIVE, rank=rank)

  def init_fn(params: optax.Params) -> CosmosState:
    def nu(p):
      return jnp.zeros((p.shape[1], min(rank, p.shape[0])), p.dtype) if _is_cosmos_matrix(p) else jnp.zeros_like(p)

    def basis(p):
      return jnp.zeros((p.shape[0], min(rank, p.shape[0])), p.dtype) if _is_cosmos_matrix(p) else None

    def gram(p):
      return jnp.zeros((min(rank, p.shape[0]),) * 2, p.dtype) if _is_cosmos_matrix(p) else None

    return CosmosState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=jax.tree.map(nu, params),
        basis=jax.tree.map(basis, params),
        gram=jax.tree.map(gram, params),
    )

  def update_fn(
      updates: optax.Updates, state: CosmosState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, CosmosState]:
    del params
    count = numerics.safe_increment(state.count)
    t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))

    def adam(g, m, v):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      direction = m / (1 - b1**t) / (jnp.sqrt(v) / jnp.sqrt(1 - b2**t) + eps)
      return direction, m, v, None, None

    def matrix(g_flax, m_flax, v, basis, gram):
      g = g_flax.T  # PyTorch layout (outputs, inputs)
      m = b1 * m_flax.T + g
      r = basis.shape[1]

      def first(basis, gram):
        del basis, gram
        _, vectors = jnp.linalg.eigh(_at_least_float32(g.T @ g))
        p = vectors[:, ::-1][:, :r].astype(g.dtype)
        gp = g @ p
        return p, (1 - b2) * gp.T @ gp

      def later(basis, gram):
        p = b2 * basis @ gram + (1 - b2) * g.T @ (g @ basis)
        p = jnp.linalg.qr(_at_least_float32(p))[0].astype(g.dtype)
        rotation = basis.T @ p
        gp = g @ p
        return p, b2 * rotation.T @ gram @ rotation + (1 - b2) * gp.T @ gp

      basis, gram = jax.lax.cond(count == 1, first, later, basis, gram)
      low_rank = g @ basis
      v = b2 * v + (1 - b2) * low_rank * low_rank
      c1 = (1 - b1**t) / (1 - b1)
      g_hat = (g + b1 * m) / (1 + b1 * c1)
      projected = g_hat @ basis
      adaptive = (projected / (jnp.sqrt(v) / jnp.sqrt(1 - b2**t) + eps)) @ basis.T
      residual = orthogonalize_via_newton_schulz(
          g_hat - projected @ basis.T, jnp.asarray(KELLER_JORDAN_COEFFS), 5, "frobenius", NEWTON_SCHULZ_EPS
      )
      residual = residual / (jnp.linalg.norm(residual) + eps)
      scale = jnp.sqrt(g.shape[0] * g.shape[1] * 1.0)
      combined = adaptive + 0.2 * scale * residual
      direction = lr_ratio * scale * combined / (jnp.linalg.norm(combined) + eps)
      return direction.T, m.T, v, basis, gram

    def per_leaf(g, m, v, basis, gram):
      out = matrix(g, m, v, basis, gram) if _is_cosmos_matrix(g) else adam(g, m, v)
      return tuple(None if x is None else x.astype(ref.dtype) for x, ref in zip(out, (g, m, v, g, g)))

    treedef = jax.tree.structure(updates)
    parts = treedef.flatten_up_to(
        jax.tree.map(per_leaf, updates, state.mu, state.nu, state.basis, state.gram, is_leaf=lambda x: x is None)
    )
    direction, mu, nu, basis, gram = (treedef.unflatten([p[k] for p in parts]) for k in range(5))
    return direction, CosmosState(count=count, mu=mu, nu=nu, basis=basis, gram=gram)

  return optax.GradientTransformation(init_fn, update_fn)


def cosmos(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    lr_ratio: jax.typing.ArrayLike = 0.1,
    rank: int = 64,
    weight_decay: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  """COSMOS with the official defaults and decoupled weight decay (lr * weight_decay * theta).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, eps, lr_ratio, rank: see :func:`scale_by_cosmos`.
    weight_decay: decoupled decay coefficient lambda, applied to every parameter.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_hyperparameters("COSMOS", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      scale_by_cosmos(b1, b2, eps, lr_ratio, rank),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
