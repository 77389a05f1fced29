"""PELA: replace a pretrained weight by its truncated-SVD low-rank factors, then tune the factors.

Paper: Guo, Wang, Kankanhalli, "PELA: Learning Parameter-Efficient Models with Low-Rank Approximation",
CVPR 2024, arXiv:2310.10700. Reference implementation followed: guoyang9/PELA
(``ALBEF/models/low_rank.py``: ``low_rank_approximate``, ``ModuleLowRank``; ``ALBEF/models/model_pretrain.py``:
``inf_norm``).

Math, on the folded ``(d_in, d_out)`` kernel ``W = U diag(σ) Vᵀ`` (Flax layout ``y = x W + b``)::

    W' = a b,      a = U_r diag(sqrt(σ_r)): (d_in, r),   b = diag(sqrt(σ_r)) V_rᵀ: (r, d_out)

i.e. the singular values are split evenly between the two factors, and at init ``a b`` is the best rank-``r``
approximation of ``W`` (Eckart-Young); with ``r = min(d_in, d_out)`` it is ``W`` itself. The reference takes the
SVD of ``weight.t()``, which is exactly the Flax kernel, and builds ``nn.Sequential(Linear(d_in, r),
Linear(r, d_out))`` with ``module_l.weight = a.T``, ``module_r.weight = b.T`` (the bias stays on the second
linear, i.e. is unchanged).

This is compression-then-tuning, not an additive adapter: ``apply`` *replaces* the kernel by ``a b`` (the base
kernel is not used), so ``unmerge`` is impossible (it raises); ``merge`` returns the dense ``a b``. Both
factors are trainable: ``r (d_in + d_out)`` parameters per matrix, no frozen leaves. The memory saving of
the paper needs a model built with two factored linears; here the (untouched) base kernel stays in memory.

Rank: ``config.rank`` (``rank_pattern`` per leaf), or, with the option ``compress_ratio = c``, the
reference's ``r = floor(d_in d_out / (c (d_in + d_out)))`` (reference default ``c = 3``; it also skips
linears with fewer than 10 outputs -- exclude those with the target regex).

Regularisers of the paper's intermediate pre-training stage: the weight-perturbation term
``mean over layers of (max|a b - W| - ε)²`` (``ε = 1e-3``; reference ``inf_norm``: PyTorch's
``torch.norm(·, inf)`` of a matrix is the largest absolute entry) is ``weight_perturbation_penalty`` below.
The feature-distillation term (``0.1 x`` MSE between teacher and student intermediate features) is a loss
on model activations, not on parameters, and is not provided here: compute it in the training loss from
the two models' ``capture_intermediates`` outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.reparam import AdapterParams, adapter_leaves
from jaxpeft.adapters.selection import named_leaves, select_targets


def pela_rank(target: Target) -> int:
  """``config.rank`` or, with option ``compress_ratio = c``, ``floor(d_in d_out / (c (d_in + d_out)))``."""
  ratio = target.option("compress_ratio")
  if ratio is None:
    return target.rank
  d_in, d_out = target.matrix_shape
  return int((d_in * d_out) // (ratio * (d_in + d_out)))


@register_method("pela")
class PELA(AdapterMethod):
  """``W' = a b``, initialised to the rank-``r`` truncated SVD of ``W``. See the module docstring."""

  inits = ("default",)
  needs_matrix = True

  option_defaults = {"compress_ratio": None}

  def validate(self, target: Target) -> None:
    ratio = target.option("compress_ratio")
    if ratio is not None and not ratio > 0:
      raise ValueError(f"{target.path}: PELA option compress_ratio must be positive, got {ratio!r}.")
    r, n = pela_rank(target), min(target.matrix_shape)
    if not 1 <= r <= n:
      raise ValueError(
          f"{target.path}: PELA rank must be in [1, min(d_in, d_out) = {n}] for the folded "
          f"shape {target.matrix_shape}, got {r} (rank / rank_pattern / compress_ratio)."
      )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    u, s, vt = jnp.linalg.svd(kernel, full_matrices=False)
    r = pela_rank(target)
    root = jnp.sqrt(s[:r])
    return {"a": u[:, :r] * root, "b": root[:, None] * vt[:r]}

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return leaves["a"] @ leaves["b"]

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    raise ValueError(
        f"{target.path}: PELA replaces the kernel by a b, so the base kernel cannot be recovered "
        "from merged weights. Keep the base params (reparam.apply never modifies them)."
    )

  def loss_term(self, config: AdapterConfig, *, weight: float, eps: float = 1e-3):
    """``weight * weight_perturbation_penalty(..., eps)`` (``penalty.weight``, optional ``penalty.eps``)."""
    if not weight >= 0:
      raise ValueError(f"PELA's penalty weight={weight} must be >= 0.")
    return lambda base_params, adapter_params, rng: weight * weight_perturbation_penalty(
        base_params, adapter_params, config, eps
    )


def weight_perturbation_penalty(
    base_params: Any, adapter_params: AdapterParams, config: AdapterConfig, eps: float = 1e-3
) -> jax.Array:
  """``mean over adapted matrices of (max|a b - W| - eps)²`` (reference ``inf_norm``; stacked layers count singly)."""
  if config.method != "pela":
    raise ValueError(f"weight_perturbation_penalty needs a PELA config, got method {config.method!r}.")
  targets = select_targets(config, base_params)
  by_path = adapter_leaves(adapter_params, targets)
  leaves = dict(named_leaves(base_params))
  terms = []
  for target in targets:
    kernel = leaves[target.path].reshape(target.stack_shape + target.matrix_shape).astype(jnp.float32)
    rebuilt = by_path[target.path]["a"] @ by_path[target.path]["b"]
    residual = jnp.max(jnp.abs(rebuilt - kernel), axis=(-2, -1))
    terms.append(((residual - eps) ** 2).reshape(-1))
  return jnp.mean(jnp.concatenate(terms))
