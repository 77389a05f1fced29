"""DoRA: weight-decomposed low-rank adaptation.

Paper: Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen, "DoRA: Weight-Decomposed Low-Rank Adaptation",
ICML 2024, arXiv:2402.09353. Reference implementations: NVlabs/DoRA and Hugging Face PEFT
(``peft/tuners/lora/dora.py``, ``variants.py``: ``LoraConfig(use_dora=True)``), which we follow.

Math, on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout, one column per output unit)::

    V  = W + s a b                      (the LoRA update, same factors, scale and inits as ``lora``)
    g  = m / stop_gradient(||V||_col)   ||.||_col: L2 norm of each column, i.e. over all input axes
    W' = V * g                          (g broadcast over rows), m: (d_out,) trainable

``m`` is initialised to ``||W + s a b||_col`` (``= ||W||_col`` for the default zero-``b`` init), so ``W' = W``
at init. The norm is treated as a constant in backpropagation (paper Sec. 4.3; PEFT always detaches it);
gradients still reach ``m`` and, through ``V``, ``a`` and ``b``. The bias is not rescaled.

The column norm is PEFT's norm in every layout: Linear ``||W_t||`` over ``d_in`` per output row; Conv over
``(c_in, kh, kw)`` per output channel (= one column of the folded ``(kh*kw*c_in, c_out)`` kernel);
Embedding over the vocabulary per feature (PEFT transposes the table, ``fan_in_fan_out=True``).

Activation-hook mode (``jaxpeft.adapters.factored``), as PEFT's forward, with ``x~ = drop(x)``::

    y = x W + bias + (g - 1) * (x~ W) + g * s * (x~ a) b        (= x W' + bias without dropout)

``g`` still needs the norm of ``W + s a b``, so this mode forms ``a b`` (d_in x d_out) once per call, like PEFT.

Unmerge is not possible from merged weights alone: ``W' = g V`` fixes only the direction of each column of
``W + s a b``, not its length, and PEFT can only unmerge because it caches the norm at merge time. Keep the
base parameters instead (``reparam.apply`` never modifies them). PiSSA inits are refused for the same
reason (they need ``unmerge`` to build the residual base).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.methods.lora import LORA_PEFT, LoRAFactors, lora_factors_init
from jaxpeft.canonical_dot import matmul


def column_norm(w: jax.Array) -> jax.Array:
  """Per-output-column L2 norm ``||W||_col`` of a folded ``(d_in, d_out)`` kernel."""
  return jnp.linalg.norm(w, axis=0)


def _updated(kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
  """``V = W + s a b``."""
  return kernel + target.scaling * (leaves["a"] @ leaves["b"])


def magnitude_scale(v: jax.Array, leaves: Leaves) -> jax.Array:
  """``g = m / ||V||_col`` with the norm detached."""
  return leaves["m"] / jax.lax.stop_gradient(column_norm(v))


_DORA_PEFT = dataclasses.replace(LORA_PEFT, claims=lambda peft_config: bool(peft_config.get("use_dora")))


@register_method("dora")
class DoRA(LoRAFactors):
  """``W' = m * (W + s a b) / ||W + s a b||_col``. See the module docstring."""

  peft = _DORA_PEFT

  def validate(self, target: Target) -> None:
    if target.init.startswith("pissa"):
      raise ValueError(
          f"{target.path}: DoRA cannot use a PiSSA init (it needs an unmergeable "
          "residual base); use init='default', 'gaussian' or 'random'."
      )
    super().validate(target)

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    leaves = lora_factors_init(rng, kernel, target)
    leaves["m"] = column_norm(_updated(kernel, leaves, target))
    return leaves

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    v = _updated(kernel, leaves, target)
    return v * magnitude_scale(v, leaves)

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    raise ValueError(
        f"{target.path}: DoRA cannot be unmerged from merged weights (the norm ||W + s a b|| is lost in "
        "the merge). Keep the base params: reparam.apply/merge return new trees and never modify them."
    )

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    g = magnitude_scale(_updated(kernel, leaves, target), leaves)
    return (g - 1.0) * matmul(x, kernel) + g * matmul(matmul(x, leaves["a"]) * target.scaling, leaves["b"])
