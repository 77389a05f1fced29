"""Merging LoRA-family adapters on their weight-space updates ``ΔW`` (not on the factors) into a new LoRA adapter.

For every module targeted by at least one input adapter ``i`` (weight ``w_i``, update ``ΔW_i`` on the folded
``(d_in, d_out)`` matrix of each layer; ``ΔW_i = 0`` where adapter ``i`` does not target the module)::

    linear:  ΔW = Σ_i w_i ΔW_i
    ties:    τ_i = trim(ΔW_i, density)            keep the k = int(density * numel) largest |entries|
             γ   = sign(Σ_i τ_i)  ("total")  or  sign(Σ_i sign τ_i)  ("frequency"), with γ = +1 where the sum is 0
             ΔW  = Σ_i w_i τ_i [sign τ_i = γ]  /  max(1, Σ_i [sign τ_i = γ])

TIES is ``jaxpeft.merging.ties`` (Yadav et al., arXiv:2306.01708) in its "paper" convention, exactly as Hugging
Face PEFT's ``peft.utils.merge_utils.ties`` computes it per tensor (trim, elect on the *unweighted* trimmed
tensors, weight, disjoint mean), applied per layer (scanned layers ranked one layer at a time). Full-model
merging methods (task arithmetic, DARE, ...) apply to adapters' updates through ``deltas`` as well.

The combined ``ΔW`` becomes a LoRA adapter (``method="lora"``, scale 1: ``alpha = r`` per module) by::

    rank=None, "linear":  concatenation (exact):  a = [w_1 s_1 a_1, ..., w_n s_n a_n],  b = [b_1; ...; b_n]
                          so a b = Σ w_i s_i a_i b_i = ΔW exactly, rank = Σ_i r_i per module
                          (PEFT's ``cat``; LoRA inputs only).
    rank=None, "ties":    exact SVD, rank min(d_in, d_out) (TIES' ΔW is generally full rank).
    rank=r / "max":       truncated SVD ΔW = U S Vᵀ, a = U_r, b = S_r V_rᵀ (rank capped at min(d_in, d_out);
                          "max" = the largest input rank of each module). The discarded part has Frobenius
                          norm sqrt(Σ_{k>r} σ_k²) (Eckart-Young). With "linear" this is PEFT's ``svd``, with
                          "ties" PEFT's ``ties_svd`` (PEFT also puts S on its lora_B; ``a = U_r`` here is PEFT's
                          ``lora_A = Vh_r`` transposed).

Any additive method (``W' = W + delta``: LoRA, rsLoRA, LoHa, LoKr, VeRA, ...) can be an input of the ΔW
combinations; concatenation needs LoRA factors. Methods whose update is not additive (DoRA) or that adapt the
bias, and PiSSA-style adapters (paired with a residual base), are refused. The result config names every
module explicitly (escaped paths in ``targets``, ``rank_pattern``, ``alpha_pattern``, ``fan_in_axes``, ``stacked_axes``), so per-module ranks survive the
combination and a save / load round trip.

Deviation from PEFT: PEFT's ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` (without ``_svd``) act
on ``lora_A`` and ``lora_B`` separately (``sqrt(w)`` on each side); that is not a combination of the
updates (Σ sqrt(w_i) a_i · Σ sqrt(w_j) b_j has cross terms), so it is not offered. PEFT's ``svd_clamp`` and the
random DARE variants are not implemented.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Target, get_method
from jaxpeft.adapters.reparam import AdapterParams, Params
from jaxpeft.adapters.selection import named_leaves, path_string, select_targets
from jaxpeft.merging.ties import ties_deltas
from jaxpeft.merging.trees import check_densities

Adapter = tuple[AdapterConfig, AdapterParams]


def _check_combinable(config: AdapterConfig, targets: Sequence[Target]) -> None:
  method = get_method(config.method)
  cls = type(method)
  if cls.apply is not AdapterMethod.apply or cls.delta is AdapterMethod.delta or method.adapts_bias:
    raise ValueError(
        f"Method {config.method!r} has no additive weight update W' = W + ΔW, so adapters of it "
        "cannot be combined on ΔW. Merge it into the base with reparam.merge instead."
    )
  if any(method.modifies_base(t) for t in targets):
    raise ValueError(
        f"init={config.init!r} pairs the adapter with a residual base, so s a b is not its update "
        "of the original weights; convert it to a plain adapter (ΔW = s a b - s a0 b0) first."
    )


def deltas(base_params: Params, adapter_params: AdapterParams, config: AdapterConfig) -> dict[str, jax.Array]:
  """``{target path: ΔW}`` in float32, folded per layer to ``stack_shape + (d_in, d_out)``.

  ``ΔW`` is ``reparam.apply`` on a zero base at the targets (exact for additive methods).
  """
  targets = {t.path: t for t in select_targets(config, base_params)}
  _check_combinable(config, list(targets.values()))
  zeros = jax.tree_util.tree_map_with_path(
      lambda kp, x: jnp.zeros(x.shape, jnp.float32) if path_string(kp) in targets else x, base_params
  )
  flat = dict(named_leaves(reparam.apply(zeros, adapter_params, config)))
  return {p: flat[p].reshape(t.stack_shape + t.matrix_shape) for p, t in targets.items()}


def combined_deltas(
    base_params: Params,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    combination: Literal["linear", "ties"] = "linear",
    *,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> dict[str, jax.Array]:
  """``{path: combined ΔW}`` (folded like ``deltas``) over the union of the adapters' targets."""
  if len(adapters) != len(weights) or not adapters:
    raise ValueError(
        f"combine needs one weight per adapter and at least one adapter, got {len(adapters)} "
        f"adapters and {len(weights)} weights."
    )
  if combination not in ("linear", "ties"):
    raise ValueError(f"Unknown combination {combination!r}; expected 'linear' or 'ties'.")
  if combination == "ties" and density is None:
    raise ValueError("combination='ties' needs density= (the fraction of each ΔW's entries kept, e.g. 0.2).")
  if combination == "ties":
    check_densities([density])
  per_adapter = [deltas(base_params, params, config) for config, params in adapters]
  out = {}
  for path in sorted(set().union(*per_adapter)):
    shape = next(d[path].shape for d in per_adapter if path in d)
    stack = [d.get(path, jnp.zeros(shape, jnp.float32)) for d in per_adapter]
    if combination == "linear":
      out[path] = sum(w * d for w, d in zip(weights, stack))
    else:
      out[path] = ties_deltas(stack, weights, density, majority_sign_method, batch_dims=len(shape) - 2)
  return out


def _targets(base_params: Params, adapters: Sequence[Adapter]) -> dict[str, list[tuple[int, Target]]]:
  """``{path: [(adapter index, Target), ...]}``, checking that all adapters fold a shared leaf alike."""
  by_path: dict[str, list[tuple[int, Target]]] = {}
  for i, (config, _) in enumerate(adapters):
    targets = select_targets(config, base_params)
    _check_combinable(config, targets)
    for target in targets:
      by_path.setdefault(target.path, []).append((i, target))
  for path, entries in by_path.items():
    folds = {(t.stacked_axes, t.fan_in_axes) for _, t in entries}
    if len(folds) > 1:
      raise ValueError(
          f"{path}: the adapters fold this leaf differently ((stacked_axes, fan_in_axes) = "
          f"{sorted(folds)}), so their updates cannot be added. Use the same fan_in_axes / "
          "stacked_axes patterns in every config."
      )
  return by_path


def _concatenate(
    adapters: Sequence[Adapter], weights: Sequence[float], by_path: dict[str, list[tuple[int, Target]]]
) -> dict[str, dict[str, jax.Array]]:
  leaves = [
      reparam.adapter_leaves(params, [t for entries in by_path.values() for j, t in entries if j == i])
      for i, (_, params) in enumerate(adapters)
  ]
  factors = {}
  for path, entries in by_path.items():
    a = [weights[i] * t.scaling * leaves[i][path]["a"] for i, t in entries]
    b = [leaves[i][path]["b"] for i, _ in entries]
    factors[path] = {"a": jnp.concatenate(a, axis=-1), "b": jnp.concatenate(b, axis=-2)}
  return factors


def _svd_factors(delta: jax.Array, rank: int) -> dict[str, jax.Array]:
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  return {"a": u[..., :rank], "b": s[..., :rank, None] * vt[..., :rank, :]}


def combine(
    base_params: Params,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    combination: Literal["linear", "ties"] = "linear",
    *,
    rank: int | Literal["max"] | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> tuple[AdapterParams, AdapterConfig]:
  """A new LoRA adapter ``(adapter_params, config)`` whose update is the combination of the inputs' ``ΔW``.

  Args:
    base_params: the base params (or ``jax.eval_shape`` structs of them) the adapters were built for.
    adapters: ``(config, adapter_params)`` pairs.
    weights: one weight ``w_i`` per adapter (negative weights subtract).
    combination: ``"linear"`` (weighted sum of ΔW) or ``"ties"``.
    rank: ``None`` for an exact result (concatenation for "linear", full-rank SVD for "ties"), an int for a
      truncated SVD at that rank, ``"max"`` for the largest input rank of each module.
    density, majority_sign_method: TIES' trim fraction and sign election (see the module docstring).
  """
  if len(adapters) != len(weights) or not adapters:
    raise ValueError(
        f"combine needs one weight per adapter and at least one adapter, got {len(adapters)} "
        f"adapters and {len(weights)} weights."
    )
  by_path = _targets(base_params, adapters)
  if combination == "linear" and rank is None:
    not_lora = sorted({c.method for c, _ in adapters} - {"lora"})
    if not_lora:
      raise ValueError(
          f"Exact concatenation needs LoRA factors, but got methods {not_lora}; pass rank= "
          "(an int or 'max') to refactor the combined ΔW by truncated SVD instead."
      )
    factors = _concatenate(adapters, weights, by_path)
  else:
    if not (rank is None or rank == "max" or (isinstance(rank, int) and rank >= 1)):
      raise ValueError(f"rank must be a positive int, 'max' or None, got {rank!r}.")
    combined = combined_deltas(
        base_params, adapters, weights, combination, density=density, majority_sign_method=majority_sign_method
    )
    factors = {}
    for path, delta in combined.items():
      full = min(delta.shape[-2:])
      if rank is None:
        wanted = full
      elif rank == "max":
        wanted = max(t.rank for _, t in by_path[path])
      else:
        wanted = rank
      factors[path] = _svd_factors(delta, min(wanted, full))
  first = adapters[0][0]
  targets = {path: entries[0][1] for path, entries in by_path.items()}
  ranks = {re.escape(p): int(f["a"].shape[-1]) for p, f in factors.items()}
  config = AdapterConfig(
      targets="|".join(sorted(ranks)),
      method="lora",
      rank=max(ranks.values()),
      alpha=float(max(ranks.values())),
      dropout=first.dropout,
      rank_pattern=ranks,
      alpha_pattern={k: float(r) for k, r in ranks.items()},
      fan_in_axes={re.escape(p): t.fan_in_axes for p, t in targets.items()},
      stacked_axes={re.escape(p): t.stacked_axes for p, t in targets.items()},
  )
  flat = {f"{p}/{name}": leaf for p, f in factors.items() for name, leaf in f.items()}
  return traverse_util.unflatten_dict(flat, sep="/"), config
