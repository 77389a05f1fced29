r"""CAME: confidence-guided adaptive memory efficient optimization.

Paper: "CAME: Confidence-guided Adaptive Memory Efficient Optimization", Yang Luo, Xiaozhe Ren,
Zangwei Zheng, Zhuo Jiang, Xin Jiang and Yang You, 2023, arXiv:2307.02047.

CAME is Adafactor with first-moment momentum whose step is rescaled by a factored estimate of its
own instability. For a parameter viewed as ``(..., n, m)`` (two *factored* axes, or axis groups,
``n`` rows and ``m`` columns; the other axes are batch axes, see "Which axes" below) and gradient
:math:`G_t`, with row/column means taken over the two factored axes:

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

Which axes (``factored_axes``): came-pytorch factors the last two axes of a tensor as PyTorch stores
it. The same layer is stored differently in Flax, so by default (``"authors"``) we factor the axes
that the authors' code factors on the same layer in PyTorch's layout:

* 2-D Dense kernel ``(I, O)`` (torch ``(O, I)``): both axes (the factorization is symmetric in them);
* conv kernel with two or more spatial axes, ``(..., kh, kw, I, O)`` (torch ``(O, I, ..., kh, kw)``):
  the last two spatial axes ``(kh, kw)``; ``I``, ``O`` (and ``kd``) are batch axes. Any leaf with four
  or more axes is read as a Flax conv kernel (leading stacked-layer axes stay batch axes);
* 3-D leaves: the last two axes. This is the authors' choice for a stacked (``nn.scan``) Dense
  kernel ``(L, I, O)``, not for a DenseGeneral kernel such as ``(D, heads, D/heads)`` (torch: a 2-D
  Linear weight, all input axes against all output axes) or a 1-D conv kernel ``(k, I, O)`` (torch
  ``(O, I, k)``: factors ``(I, k)``); pass a callable for those.

``factored_axes="last_two"`` factors the last two axes as stored (what came-pytorch would do on our
layout; the behaviour before 2026-12). A callable ``factored_axes(path, shape)`` chooses per leaf:
it returns ``(rows, cols)``, each an axis or a tuple of axes (a group is flattened into one axis, e.g.
``((0,), (1, 2))`` for a ``(D, heads, D/heads)`` query kernel, as its torch Linear), or ``None`` for an
unfactored second moment; ``path`` is the '/'-joined key path.

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

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from jaxpeft.optim._hyperparameter_checks import NON_NEGATIVE, POSITIVE, Interval, check_hyperparameters

# As in the authors' code, which asserts 0 <= beta <= 1 (there is no bias correction to divide by 1 - beta).
_DECAY_RATE = Interval(0.0, 1.0, high_open=False)


class CameState(NamedTuple):
  """State of `scale_by_came`. Every field is a tree with the parameters' structure.

  For a factored parameter, `nu` holds an empty placeholder and `nu_row`/`nu_col` (`res_row`/
  `res_col`) the factored second moment (instability): shapes `batch + (n,)` and `batch + (m,)` of
  its `(batch..., n, m)` view (module docstring); for an unfactored one (vectors, scalars, or as
  `factored_axes` says) `nu` holds the full second moment and the four factored fields are empty.
  """

  mu: optax.Updates  # first moment of the clipped, preconditioned gradient (parameter shape)
  nu_row: optax.Updates  # batch + (n,)
  nu_col: optax.Updates  # batch + (m,)
  nu: optax.Updates  # shape (unfactored leaves only)
  res_row: optax.Updates  # batch + (n,)
  res_col: optax.Updates  # batch + (m,)


Axes = int | tuple[int, ...]
FactoredAxes = Callable[[str, tuple[int, ...]], tuple[Axes, Axes] | None]


def authors_axes(path: str, shape: tuple[int, ...]) -> tuple[Axes, Axes] | None:
  """The axes came-pytorch factors on the same layer in PyTorch's layout (module docstring)."""
  del path
  if len(shape) < 2:
    return None
  if len(shape) >= 4:  # Flax conv kernel (..., kh, kw, I, O); torch (O, I, ..., kh, kw).
    return len(shape) - 4, len(shape) - 3
  return len(shape) - 2, len(shape) - 1


def last_two_axes(path: str, shape: tuple[int, ...]) -> tuple[Axes, Axes] | None:
  """The last two axes as stored (what came-pytorch does to a tensor of this layout)."""
  del path
  return (len(shape) - 2, len(shape) - 1) if len(shape) >= 2 else None


_NAMED_AXES: dict[str, FactoredAxes] = {"authors": authors_axes, "last_two": last_two_axes}


class _View(NamedTuple):
  """A leaf seen as `(batch..., n, m)`: `perm` moves batch, row and column axes into that order."""

  perm: tuple[int, ...]
  batch: tuple[int, ...]
  n: int
  m: int

  def fold(self, x: jax.Array) -> jax.Array:
    return jnp.transpose(x, self.perm).reshape(self.batch + (self.n, self.m))

  def unfold(self, y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    permuted = tuple(shape[a] for a in self.perm)
    return jnp.transpose(y.reshape(permuted), np.argsort(self.perm))


def _view(rule: FactoredAxes, path: str, shape: tuple[int, ...]) -> _View | None:
  axes = rule(path, shape)
  if axes is None:
    return None
  rows, cols = (tuple(np.atleast_1d(a).tolist()) for a in axes)
  chosen = rows + cols
  if not rows or not cols or len(set(chosen)) != len(chosen) or not all(0 <= a < len(shape) for a in chosen):
    raise ValueError(
        f"CAME factored_axes gave {axes!r} for {path!r} of shape {shape}: expected (rows, cols), "
        "two non-empty, disjoint axes or tuples of axes of that shape, or None (unfactored)."
    )
  batch = tuple(a for a in range(len(shape)) if a not in chosen)
  return _View(
      batch + rows + cols,
      tuple(shape[a] for a in batch),
      math.prod(shape[a] for a in rows),
      math.prod(shape[a] for a in cols),
  )


def _empty(x: jax.Array) -> jax.Array:
  """Placeholder for a statistic a leaf does not use: one element, as Orbax cannot save zero-size arrays."""
  return jnp.zeros((1,), x.dtype)


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
    factored_axes: str | FactoredAxes = "authors",
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
    factored_axes: which axes of each leaf are factored: "authors" (the axes came-pytorch factors
      on the same layer in PyTorch's layout), "last_two" (the last two as stored), or a callable
      `(path, shape) -> (rows, cols) | None` (module docstring).

  Returns:
    An `optax.GradientTransformation`.
  """
  if isinstance(factored_axes, str):
    if factored_axes not in _NAMED_AXES:
      raise ValueError(
          f"CAME factored_axes={factored_axes!r}: use one of {sorted(_NAMED_AXES)} or a callable "
          "(path, shape) -> (rows, cols) | None."
      )
    factored_axes = _NAMED_AXES[factored_axes]
  check_hyperparameters("CAME", _DECAY_RATE, "Defaults: b1=0.9, b2=0.999, b3=0.9999.", b1=b1, b2=b2, b3=b3)
  check_hyperparameters("CAME", NON_NEGATIVE, "Defaults: eps=1e-30, eps_res=1e-16.", eps=eps, eps_res=eps_res)
  check_hyperparameters("CAME", POSITIVE, "The authors' default is 1.0.", clip_threshold=clip_threshold)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def views(tree: optax.Params) -> list[_View | None]:
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        _view(factored_axes, jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape))
        for path, leaf in paths_and_leaves
    ]

  def init_fn(params: optax.Params) -> CameState:
    treedef = jax.tree.structure(params)
    leaves, leaf_views = treedef.flatten_up_to(params), views(params)

    def stat(view: _View | None, p: jax.Array, size: Callable[[_View], int]) -> jax.Array:
      return _empty(p) if view is None else jnp.zeros(view.batch + (size(view),), p.dtype)

    def rows() -> optax.Params:  # A fresh tree per field: state leaves never share a buffer.
      return treedef.unflatten([stat(v, p, lambda v: v.n) for v, p in zip(leaf_views, leaves)])

    def cols() -> optax.Params:
      return treedef.unflatten([stat(v, p, lambda v: v.m) for v, p in zip(leaf_views, leaves)])

    return CameState(
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu_row=rows(),
        nu_col=cols(),
        nu=treedef.unflatten([jnp.zeros_like(p) if v is None else _empty(p) for v, p in zip(leaf_views, leaves)]),
        res_row=rows(),
        res_col=cols(),
    )

  def update_leaf(
      view: _View | None,
      grad: jax.Array,
      mu: jax.Array,
      nu_row: jax.Array,
      nu_col: jax.Array,
      nu: jax.Array,
      res_row: jax.Array,
      res_col: jax.Array,
  ) -> tuple[jax.Array, ...]:
    """One CAME step for one parameter; returns (update, *new state leaves)."""
    compute_dtype = jnp.promote_types(grad.dtype, jnp.float32)
    factored = view is not None
    g = (view.fold(grad) if factored else grad).astype(compute_dtype)
    sq = jnp.square(g) + eps
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
    new_mu = _ema(b1, (view.fold(mu) if factored else mu).astype(compute_dtype), u)
    if factored:
      instability = jnp.square(u - new_mu) + eps_res
      new_res_row = _ema(b3, res_row.astype(compute_dtype), jnp.mean(instability, axis=-1))
      new_res_col = _ema(b3, res_col.astype(compute_dtype), jnp.mean(instability, axis=-2))
      update = new_mu * _factored_rsqrt(new_res_row, new_res_col)
    else:
      new_res_row, new_res_col = res_row, res_col
      update = new_mu
    if factored:
      update, new_mu = view.unfold(update, grad.shape), view.unfold(new_mu, grad.shape)
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
            views(updates), treedef.flatten_up_to(updates), *(treedef.flatten_up_to(field) for field in state)
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
    factored_axes: str | FactoredAxes = "authors",
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
    factored_axes: which axes of each leaf are factored; "authors" (default), "last_two" or a
      callable, see `scale_by_came` and the module docstring.

  Returns:
    An `optax.GradientTransformation`.
  """
  core = scale_by_came(b1, b2, b3, eps, eps_res, clip_threshold, mu_dtype, factored_axes)
  decay = optax.add_decayed_weights(weight_decay, mask)
  steps = (core, decay) if weight_decouple else (decay, core)
  return optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))
