"""Hot-swapping LoRA adapters without recompiling: pad to a maximum rank and fold the scale into ``b``.

Under ``jax.jit`` the adapter *parameters* are ordinary arguments (swap them freely, as long as their shapes
and dtypes stay the same), while the ``AdapterConfig`` is a static argument (it decides the structure and the
scale ``s = alpha / r``). Adapters of different ranks or alphas therefore differ in both, and each would
trigger a new compilation. ``pad_to_rank`` rewrites a LoRA adapter so that every adapter of rank ``<= R``
has the same shapes and the same config::

    a' = [a, 0]          (d_in, R)     zero columns r..R-1
    b' = [s b ; 0]       (R, d_out)    the adapter's scale folded in, zero rows r..R-1
    s' = alpha' / R = 1  (alpha' = R, use_rslora=False, no rank/alpha patterns)

so ``s' a' b' = s a b`` exactly (the padded products add exact zeros; ``s b`` rounds once in float32).
Per-module ranks (``rank_pattern``) and alphas (``alpha_pattern``) are folded the same way, module by
module. The padded config keeps ``targets``, ``fan_in_axes``, ``stacked_axes`` and ``dropout`` (and sets
``init="default"``, which only matters for fresh inits): adapters that target different leaves cannot share
a compiled step.

This follows Hugging Face PEFT's ``prepare_model_for_compiled_hotswap`` / ``hotswap_adapter``
(``peft/utils/hotswap.py``), which pads ``lora_A``/``lora_B`` with zeros to ``target_rank`` and turns the
scale into a tensor so that a new alpha does not recompile; here the scale lives in ``b`` instead, because the
config must be a hashable static value. PiSSA-style adapters (their base is a residual) are refused: they
cannot share one base with other adapters.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import get_method
from jaxpeft.adapters.reparam import AdapterParams, Params, adapter_leaves
from jaxpeft.adapters.selection import select_targets


def padded_config(config: AdapterConfig, max_rank: int) -> AdapterConfig:
  """The config shared by every adapter of ``config``'s targets padded to ``max_rank`` (scale 1)."""
  return dataclasses.replace(
      config,
      rank=max_rank,
      alpha=float(max_rank),
      use_rslora=False,
      rank_pattern=(),
      alpha_pattern=(),
      init="default",
  )


def pad_to_rank(
    base_params: Params, adapter_params: AdapterParams, config: AdapterConfig, max_rank: int
) -> tuple[AdapterParams, AdapterConfig]:
  """``(padded adapter, padded config)`` with the same ``apply`` output as ``(adapter_params, config)``.

  Args:
    base_params: the base model's params (or ``jax.eval_shape`` structs of them): resolves the targets.
    adapter_params: a LoRA/rsLoRA adapter built with ``config``.
    config: its config (``method == "lora"``).
    max_rank: the common rank ``R``; must be ``>=`` every module's rank.
  """
  if config.method != "lora":
    raise ValueError(
        f"pad_to_rank handles LoRA adapters (method 'lora', rsLoRA included), got method " f"{config.method!r}."
    )
  targets = select_targets(config, base_params)
  method = get_method(config.method)
  if any(method.modifies_base(t) for t in targets):
    raise ValueError(
        f"init={config.init!r} pairs the adapter with a residual base (W - s a0 b0), so it cannot "
        "share a base with other adapters. Convert it to a plain LoRA adapter first."
    )
  too_big = {t.path: t.rank for t in targets if t.rank > max_rank}
  if too_big:
    raise ValueError(
        f"max_rank={max_rank} is smaller than the rank of {too_big}; pass a max_rank of at least "
        f"{max(too_big.values())}."
    )
  by_path = adapter_leaves(adapter_params, targets)
  flat = {}
  for target in targets:
    a, b = by_path[target.path]["a"], by_path[target.path]["b"]
    pad = max_rank - target.rank
    flat[f"{target.path}/a"] = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    flat[f"{target.path}/b"] = jnp.pad(target.scaling * b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
  return traverse_util.unflatten_dict(flat, sep="/"), padded_config(config, max_rank)
