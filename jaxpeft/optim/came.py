r"""CAME: confidence-guided adaptive memory efficient optimization.

Paper: "CAME: Confidence-guided Adaptive Memory Efficient Optimization", Yang Luo, Xiaozhe Ren,
Zangwei Zheng, Zhuo Jiang, Xin Jiang and Yang You, 2023, arXiv:2307.02047.

CAME is Adafactor with first-moment momentum whose step is rescaled by a factored estimate of its
own instability. For a parameter of shape ``(..., n, m)`` (two or more axes) and gradient
:math:`G_t`, with row/column means taken over the last two axes (leading axes are batch axes):

.. math::

  R_t &= \beta_2 R_{t-1} + (1-\beta_2)\,\mathrm{mean}_{\text{cols}}(G_t^2 + \epsilon_1), \qquad
  C_t  = \beta_2 C_{t-1} + (1-\beta_2)\,\mathrm{mean}_{\text{rows}}(G_t^2 + \epsilon_1) \\
  V_t &= R_t C_t^\top / \mathrm{mean}(R_t), \qquad
  U_t  = G_t / \sqrt{V_t}, \qquad
  \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t) / d) \\
  M_t &= \beta_1 M_{t-1} + (1-\beta_1) \hat U_t \\
  \text{instability } &(\hat U_t - M_t)^2 + \epsilon_2
       \;\to\; R'_t, C'_t \text{ with } \beta_3, \qquad S_t = R'_t C'^\top_t / \mathrm{mean}(R'_t) \\
  \theta_t &= \theta_{t-1} - \eta_t \,(M_t / \sqrt{S_t} + \lambda \theta_{t-1})

:math:`R, C, R', C'` hold ``prod(shape[:-1]) + prod(shape[:-2]) * m`` numbers each pair, i.e.
``n + m`` for a matrix instead of ``n * m``. Parameters with fewer than two axes keep an unfactored
:math:`V_t = \beta_2 V_{t-1} + (1-\beta_2)(G_t^2+\epsilon_1)` and take the step :math:`M_t`
itself (no confidence scaling), exactly as the reference does. The RMS clip is per tensor.

Reference followed: the authors' package came-pytorch 0.1.3 (``came_pytorch.CAME``; defaults
``betas=(0.9, 0.999, 0.9999)``, ``eps=(1e-30, 1e-16)``, ``clip_threshold=1.0``,
``weight_decay=0``; ``lr`` has no default). Its ``eps[0]``/``eps[1]`` are our ``eps``/``eps_res``.
There is no bias correction. Weight decay is decoupled and multiplied by the learning rate
(``p -= lr * weight_decay * p`` before the step).

Known differences between references: ``pytorch_optimizer.CAME`` (4.1) computes the same update
(its momentum uses ``lerp``, equal up to rounding) and adds switches: ``weight_decouple=False``
(L2 penalty added to the gradient before everything else) is offered here under the same name;
``fixed_decay``, ``ams_bound`` (not in the paper) and ``maximize`` are not. Its default
``lr=2e-4`` is not the authors' (who require an explicit ``lr``).

Why not optax: optax has no CAME, and `optax.scale_by_factored_rms` (Adafactor) is not a faithful
building block here: it factors the two *largest* axes only for dims >= 128, uses a step-dependent
decay :math:`1 - t^{-0.8}` and adds :math:`\epsilon` differently.

Precision: the arithmetic runs in at least float32 (as the reference upcasts half-precision
gradients); state leaves are stored in the parameters' dtype (`mu_dtype` for the momentum). In
float32 and bfloat16, gradients above ~1e19 overflow :math:`G^2` to inf and give NaN, as the
reference does in float32. All reductions are within one tensor, so under ``jit`` with sharded
parameters XLA inserts any needed communication and under ``pmap`` (replicated parameters) each
device computes the single-device result; no ``axis_name`` is needed.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from jaxpeft.optim._hyperparameter_checks import NON_NEGATIVE, POSITIVE, Interval, check_hyperparameters

# As in the authors' code, which asserts 0 <= beta <= 1 (there is no bias correction to divide by 1 - beta).
_DECAY_RATE = Interval(0.0, 1.0, high_open=False)


class CameState(NamedTuple):
  """State of `scale_by_came`. Every field is a tree with the parameters' structure.

  For a parameter with two or more axes, `nu` holds an empty placeholder and `nu_row`/`nu_col`
  (`res_row`/`res_col`) the factored second moment (instability) over the last two axes; for a
  vector or scalar `nu` holds the full second moment and the four factored fields are empty.
  """

  mu: optax.Updates  # first moment of the clipped, preconditioned gradient
  nu_row: optax.Updates  # shape[:-1]
  nu_col: optax.Updates  # shape[:-2] + shape[-1:]
  nu: optax.Updates  # shape (vectors and scalars only)
  res_row: optax.Updates  # shape[:-1]
  res_col: optax.Updates  # shape[:-2] + shape[-1:]


def _is_factored(x: jax.Array) -> bool:
  return x.ndim >= 2


def _empty(x: jax.Array) -> jax.Array:
  """Placeholder for a statistic a leaf does not use: one element, as Orbax cannot save zero-size arrays."""
  return jnp.zeros((1,), x.dtype)


def _row_zeros(x: jax.Array) -> jax.Array:
  return jnp.zeros(x.shape[:-1], x.dtype) if _is_factored(x) else _empty(x)


def _col_zeros(x: jax.Array) -> jax.Array:
  return jnp.zeros(x.shape[:-2] + x.shape[-1:], x.dtype) if _is_factored(x) else _empty(x)


def _ema(decay: ArrayLike, old: jax.Array, new: jax.Array) -> jax.Array:
  return decay * old + (1 - decay) * new


def _factored_rsqrt(row: jax.Array, col: jax.Array) -> jax.Array:
  """1 / sqrt(row col^T / mean(row)), broadcast over the leading batch axes."""
  row_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
  return row_factor[..., :, None] * jax.lax.rsqrt(col)[..., None, :]


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def scale_by_came(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    b3: ArrayLike = 0.9999,
    eps: ArrayLike = 1e-30,
    eps_res: ArrayLike = 1e-16,
    clip_threshold: ArrayLike = 1.0,
    mu_dtype: DTypeLike | None = None,
) -> optax.GradientTransformation:
  """Rescales gradients by the CAME rule (module docstring); no learning rate, no weight decay.

  Args:
    b1: Decay rate of the momentum of the clipped update.
    b2: Decay rate of the (factored) second moment of the gradient.
    b3: Decay rate of the factored instability (confidence) statistics.
    eps: Added to the squared gradient (authors' `eps[0]`).
    eps_res: Added to the squared instability (authors' `eps[1]`).
    clip_threshold: Per-tensor RMS above which the preconditioned gradient is scaled down.
    mu_dtype: dtype of the momentum; `None` keeps the parameters' dtype.

  Returns:
    An `optax.GradientTransformation`.
  """
  check_hyperparameters("CAME", _DECAY_RATE, "Defaults: b1=0.9, b2=0.999, b3=0.9999.", b1=b1, b2=b2, b3=b3)
  check_hyperparameters("CAME", NON_NEGATIVE, "Defaults: eps=1e-30, eps_res=1e-16.", eps=eps, eps_res=eps_res)
  check_hyperparameters("CAME", POSITIVE, "The authors' default is 1.0.", clip_threshold=clip_threshold)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params: optax.Params) -> CameState:
    return CameState(
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu_row=jax.tree.map(_row_zeros, params),
        nu_col=jax.tree.map(_col_zeros, params),
        nu=jax.tree.map(lambda p: _empty(p) if _is_factored(p) else jnp.zeros_like(p), params),
        res_row=jax.tree.map(_row_zeros, params),
        res_col=jax.tree.map(_col_zeros, params),
    )

  def update_leaf(
      grad: jax.Array, mu: jax.Array, nu_row: jax.Array, nu_col: jax.Array, nu: jax.Array,
      res_row: jax.Array, res_col: jax.Array,
  ) -> tuple[jax.Array, ...]:
    """One CAME step for one parameter; returns (update, *new state leaves)."""
    compute_dtype = jnp.promote_types(grad.dtype, jnp.float32)
    g = grad.astype(compute_dtype)
    sq = jnp.square(g) + eps
    factored = _is_factored(g)
    if factored:
      new_nu_row = _ema(b2, nu_row.astype(compute_dtype), jnp.mean(sq, axis=-1))
      new_nu_col = _ema(b2, nu_col.astype(compute_dtype), jnp.mean(sq, axis=-2))
      new_nu = nu
      u = g * _factored_rsqrt(new_nu_row, new_nu_col)
    else:
      new_nu_row, new_nu_col = nu_row, nu_col
      new_nu = _ema(b2, nu.astype(compute_dtype), sq)
      u = g * jax.lax.rsqrt(new_nu)
    u = u / jnp.maximum(1.0, _rms(u) / clip_threshold)
    new_mu = _ema(b1, mu.astype(compute_dtype), u)
    if factored:
      instability = jnp.square(u - new_mu) + eps_res
      new_res_row = _ema(b3, res_row.astype(compute_dtype), jnp.mean(instability, axis=-1))
      new_res_col = _ema(b3, res_col.astype(compute_dtype), jnp.mean(instability, axis=-2))
      update = new_mu * _factored_rsqrt(new_res_row, new_res_col)
    else:
      new_res_row, new_res_col = res_row, res_col
      update = new_mu
    return (
        update.astype(grad.dtype),
        new_mu.astype(mu.dtype),
        new_nu_row.astype(nu_row.dtype),
        new_nu_col.astype(nu_col.dtype),
        new_nu.astype(nu.dtype),
        new_res_row.astype(res_row.dtype),
        new_res_col.astype(res_col.dtype),
    )

  def update_fn(
      updates: optax.Updates, state: CameState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, CameState]:
    del params
    treedef = jax.tree.structure(updates)
    per_leaf = [
        update_leaf(*leaves)
        for leaves in zip(
            treedef.flatten_up_to(updates), *(treedef.flatten_up_to(field) for field in state)
        )
    ]
    new_updates, *new_fields = (treedef.unflatten(column) for column in zip(*per_leaf))
    return new_updates, CameState(*new_fields)

  return optax.GradientTransformation(init_fn, update_fn)


def came(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    b3: ArrayLike = 0.9999,
    eps: ArrayLike = 1e-30,
    eps_res: ArrayLike = 1e-16,
    clip_threshold: ArrayLike = 1.0,
    weight_decay: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    weight_decouple: bool = True,
    mask: optax.Params | None = None,
) -> optax.GradientTransformation:
  """CAME with the defaults of the authors' came-pytorch 0.1.3 (which has no default `lr`).

  With `weight_decouple=True` (authors): `theta <- theta - learning_rate * (update + weight_decay
  * theta)`. With `weight_decouple=False` (pytorch_optimizer's switch): `weight_decay * theta` is
  added to the gradient before CAME preconditions it. Like `optax.adamw`, `update` needs `params`.

  Args:
    learning_rate: A float or an optax schedule. The paper's experiments use 1e-4 to 2e-4.
    b1: Decay rate of the momentum.
    b2: Decay rate of the factored second moment.
    b3: Decay rate of the factored instability.
    eps: Added to the squared gradient (authors' `eps[0]`).
    eps_res: Added to the squared instability (authors' `eps[1]`).
    clip_threshold: RMS threshold `d` of the update clipping.
    weight_decay: Weight decay coefficient.
    mu_dtype: dtype of the momentum; `None` keeps the parameters' dtype.
    weight_decouple: Decoupled (True, authors) or L2-coupled (False) weight decay.
    mask: Tree (or callable returning one) of booleans: where to apply weight decay.

  Returns:
    An `optax.GradientTransformation`.
  """
  core = scale_by_came(b1, b2, b3, eps, eps_res, clip_threshold, mu_dtype)
  decay = optax.add_decayed_weights(weight_decay, mask)
  steps = (core, decay) if weight_decouple else (decay, core)
  return optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))
