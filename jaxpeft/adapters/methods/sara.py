"""SaRA: train the small-magnitude ("temporarily ineffective") weights as a sparse delta, progressively.

Paper: Hu, Zhang, Yi, Huang, Wang, Ma, "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive
Sparse Low-Rank Adaptation", ICLR 2025, arXiv:2409.06633. Reference implementation followed:
sjtuplayer/SaRA ``optim/adamw.py`` (the method lives inside its AdamW).

Parameterisation (method ``"sara"``), on each targeted leaf folded to ``(d_in, d_out)`` (any leaf: the
reference adapts every parameter tensor, biases and norms included)::

    M  = 1[|W_0| < tau]                       (fixed at init; option ``threshold`` = tau, default 2e-3)
    W' = W_0 + M * delta                      (delta: (d_in, d_out), zero at init, so W' = W_0)

Leaves: ``delta`` (trained) and ``mask`` (float32 0/1, a frozen leaf: stored and checkpointed, never
trained; ``partition.optimizer_labels`` labels it "frozen"). Trainable parameter count (the entries that
can change): ``#{i : |W_0,i| < tau}``. Mergeable (additive), so ``merge``/``unmerge`` are exact.
This equals the reference's ``W = W_0 (1 - M) + theta M`` with ``theta = W_0 + delta`` on the masked
entries. The mask is stored explicitly (the reference re-derives it from ``tau`` at load time, which silently
changes if the base weights were cast, e.g. to bfloat16).

Progressive schedule (``reselect``): after ``progressive_iter`` steps the reference (``optim/adamw.py``,
its default) recomputes the mask with the same ``tau`` on the *current* weights (the entries that are
still ineffective, trained or not; entries that left the mask keep their trained values, frozen) and
builds a fresh optimizer on the new entries (moments and Adam's step count restart; its learning-rate
scheduler runs on). ``reselect(base, adapter, config) -> (merged_base, fresh_adapter)`` does that: it
merges the first round into the base and draws a new mask on it; restart the optimizer state afterwards.
The final weights are ``reparam.apply_many(W_0, [(config, round_1), (config, round_2)])``. The training
harness runs it every ``config.adapter.reselect_every`` steps between two steps and restarts the optimizer
state but the schedule's position (``jaxpeft.train.step.make_reselect_step``); the reference re-selects
once, and drops the update of the step it re-selects in (its ``step()`` returns early), which we do not.
(Its alternative ``optim/adamw2.py``, without unstructural backpropagation, instead intersects the new
mask with the old one and keeps the optimizer state.)

Low-rank regulariser (``nuclear_norm_penalty``): ``lambda_rank * ||M * W'||_*`` (the nuclear norm of the
trainable entries' current values, as the reference's ``param * mask``), summed over the linear-layer
targets whose folded matrix has both dimensions > ``min_dim`` (reference: 64), or, given ``rng``, on one such
target drawn uniformly, as the reference does every step. The reference takes only 2-D weights (PyTorch
``Linear``: ``len(p.shape) == 2``), never conv kernels; here a Flax conv kernel is a per-layer leaf of 4 or more
axes whose input axes are all but the last (``(*window, c_in, c_out)``, ``fan_in_axes = ndim - 1``) and is left
out. A 1-D conv kernel ``(k, c_in, c_out)`` looks like a DenseGeneral kernel and is kept: exclude it with
``min_dim`` or the target regex. It is a *loss term* (add it to the loss), not a
``GradientTransformation``: it depends on the base weights and the mask, which optax transforms do not
see, and the reference adds its gradient to the loss gradient *before* the AdamW step, which is exactly
what differentiating ``loss + penalty`` does. Its gradient is the minimum-norm subgradient ``M * (U_+
V_+^T)`` (``U_+``, ``V_+``: the singular vectors of the non-zero singular values of ``X = M * W'``),
implemented as ``sum(stop_gradient(U_+ V_+^T) * X)``, whose value is ``sum(S)``. Differentiating through the
SVD instead gives an arbitrary element of the subdifferential when ``X`` is rank deficient (the masked
sparse matrix usually is).

Deviations from the reference, and why:
  * The reference writes ``|theta|`` into the masked slots when it first wraps the model (a sign flip of
    small negative weights, undone after the first step, which looks accidental); we start from ``W_0``.
  * In the reference the nuclear-norm gradient lands on the original ``nn.Parameter`` objects, which are no
    longer in the optimizer's parameter list after wrapping, so as far as we can read it the regulariser
    never reaches the update; here it does, as the paper describes.
  * Weight decay (the reference's AdamW default 1e-2) acts on ``theta`` there and on ``delta`` here (decay
    towards ``W_0`` instead of towards 0); choose the optimizer's ``weight_decay`` accordingly.
  * "Unstructural backpropagation" (gradients and optimizer state only for the masked entries) is replaced by
    a dense masked ``delta``: its size would be data dependent, which ``jit``/``eval_shape`` cannot express.
    Gradients outside the mask are exactly zero, so any optimizer without weight decay leaves them at 0.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, fold, register_method
from jaxpeft.adapters.selection import named_leaves, select_targets

MASK = "mask"


@register_method("sara")
class SaRA(AdapterMethod):
  """``W' = W_0 + 1[|W_0| < tau] * delta``. See the module docstring."""

  option_defaults = {"threshold": 2e-3}
  frozen_leaves = frozenset({MASK})

  def validate(self, target: Target) -> None:
    if not target.option("threshold") > 0:
      raise ValueError(
          f"{target.path}: SaRA's option 'threshold' must be > 0, got " f"{target.option('threshold')}."
      )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    del rng
    mask = (jnp.abs(kernel) < target.option("threshold")).astype(jnp.float32)
    return {"delta": jnp.zeros_like(kernel), MASK: mask}

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return leaves[MASK] * leaves["delta"]

  def trained_count(self, leaves: Leaves) -> int:
    return int((leaves[MASK] != 0).sum())  # only the masked entries of the delta are trained

  def loss_term(self, config: AdapterConfig, *, lambda_rank: float, min_dim: int = 64, sample: bool = True):
    """The nuclear norm (``penalty.lambda_rank``, optional ``penalty.min_dim``, ``penalty.sample``)."""
    if not lambda_rank > 0:
      raise ValueError(f"SaRA's penalty lambda_rank={lambda_rank} must be > 0 (the reference uses 5e-4).")
    return lambda base_params, adapter_params, rng: nuclear_norm_penalty(
        base_params, adapter_params, config, lambda_rank, min_dim=min_dim, rng=rng if sample else None
    )

  def reselect(self, base_params: Any, adapter_params: Any, config: AdapterConfig) -> tuple[Any, Any]:
    return reselect(base_params, adapter_params, config)


def reselect(base_params: Any, adapter_params: Any, config: AdapterConfig) -> tuple[Any, Any]:
  """The progressive step: ``(merged_base, fresh_adapter)`` with the mask redrawn on the merged weights."""
  merged = reparam.merge(base_params, adapter_params, config)
  return merged, reparam.init(jax.random.key(0), config, merged)


def _is_conv_kernel(target: Target) -> bool:
  """A Flax conv kernel ``(*window, c_in, c_out)`` of 2+ window axes (the reference skips conv weights)."""
  ndim = len(target.layer_shape)
  return ndim >= 4 and target.fan_in_axes == ndim - 1


def _nuclear_norm(x: jax.Array) -> jax.Array:
  """``||x||_*`` with the minimum-norm subgradient ``U_+ V_+^T`` (see the module docstring)."""
  u, s, vt = jnp.linalg.svd(jax.lax.stop_gradient(x), full_matrices=False)
  nonzero = s > s[0] * max(x.shape) * jnp.finfo(x.dtype).eps
  return jnp.sum(jax.lax.stop_gradient((u * nonzero) @ vt) * x)


def nuclear_norm_penalty(
    base_params: Any,
    adapter_params: Any,
    config: AdapterConfig,
    lambda_rank: float,
    *,
    min_dim: int = 64,
    rng: jax.Array | None = None,
) -> jax.Array:
  """``lambda_rank * ||M * W'||_*`` over the eligible targets, or one drawn with ``rng`` (module docstring).

  Differentiable in ``adapter_params`` (add it to the training loss). Stacked targets count each layer
  as one matrix. Raises if no target's folded matrix has both dimensions > ``min_dim``.
  """
  all_targets = select_targets(config, base_params)
  targets = [t for t in all_targets if min(t.matrix_shape) > min_dim and not _is_conv_kernel(t)]
  if not targets:
    raise ValueError(
        f"nuclear_norm_penalty: no SaRA target is a linear-layer kernel whose folded matrix has "
        f"both dimensions > min_dim={min_dim}; lower min_dim or drop the penalty."
    )
  leaves = dict(named_leaves(base_params))
  by_path = reparam.adapter_leaves(adapter_params, all_targets)

  def one(target: Target, layer: int) -> jax.Array:
    kernel = fold(leaves[target.path].reshape((-1,) + target.layer_shape)[layer], target)
    mask, delta = (by_path[target.path][k].reshape((-1,) + target.matrix_shape)[layer] for k in (MASK, "delta"))
    mask = jax.lax.stop_gradient(mask)
    return _nuclear_norm(mask * (kernel + mask * delta))

  terms = [functools.partial(one, t, i) for t in targets for i in range(math.prod(t.stack_shape))]
  if rng is None:
    return lambda_rank * sum(term() for term in terms)
  return lambda_rank * jax.lax.switch(jax.random.randint(rng, (), 0, len(terms)), terms)
