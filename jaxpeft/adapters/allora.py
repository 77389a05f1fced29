"""ALLoRA: LoRA without dropout and without the alpha/r scale, trained with a per-row adaptive learning rate.

Paper: Huang, Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", 2024,
arXiv:2410.09692. No reference implementation has been published; the adaptive rate below is our
reconstruction from the paper's abstract and summary ("scaling the per sample and per parameter gradients
with a coefficient inversely proportional to parameters' l2 norm"), recorded as [reconstructed] in
shared/research/adapters.md 1.10. We could not read the paper's method section; check the constant and
the normalisation group there before relying on exact numbers.

Parameterisation (method ``"allora"``), on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W``)::

    W' = W + a @ b,      a: (d_in, r),  b: (r, d_out)       (no alpha/r factor, no dropout)

Init as LoRA's default (``a ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``, ``b = 0``; ``config.init`` "gaussian" and
"random" as in ``jaxpeft.adapters.lora``), so ``W' = W`` at init. ``config.alpha`` is ignored; a non-zero
``config.dropout`` is an error. Trainable parameters per matrix: ``r (d_in + d_out)``. Mergeable.

Adaptive learning rate (``scale_by_allora``), for every row ``v`` (last axis) of each factor leaf::

    u_v  <-  u_v / sqrt(||v||^2 + 1 / eta^2)

where ``u_v`` is the incoming update (or gradient) of that row and ``v`` the row's current value. At
``v = 0`` the factor is ``eta`` (a large step that lets ``b`` escape zero quickly); it decays like
``1/||v||`` as the row grows. The factor depends on the parameters only, so scaling the summed
gradient equals scaling every per-sample gradient, as the paper states. Rows are the last axis of the
Flax-layout leaves: the ``r`` entries of ``a`` that belong to one input unit, and the ``d_out`` entries
of ``b`` that belong to one rank component (``W + a b`` is the paper's ``W + A B`` read literally).

Composition: it is an ``optax.GradientTransformation`` needing ``params``. Placed *after* the base
optimizer it rescales each row's step, i.e. it is a per-row learning rate (recommended: with Adam-type
optimizers a row-constant factor placed *before* the optimizer is largely cancelled by the second-moment
normalisation)::

    tx = optax.chain(optax.adamw(1e-3), scale_by_allora(eta=4.0))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.lora import lora_factors_init

_INITS = ("default", "gaussian", "random")


@register_method("allora")
class ALLoRA(AdapterMethod):
    """``W' = W + a b`` (no scale, no dropout). See the module docstring."""

    def validate(self, target: Target) -> None:
        if target.fan_in_axes == 0:
            raise ValueError(f"{target.path}: ALLoRA needs a kernel with input and output axes, got per-layer "
                             f"shape {target.layer_shape}; exclude it from AdapterConfig.targets.")
        if target.dropout:
            raise ValueError(f"{target.path}: ALLoRA removes LoRA's dropout; set AdapterConfig.dropout=0 "
                             f"(got {target.dropout}).")
        if target.init not in _INITS:
            raise ValueError(f"{target.path}: unknown init {target.init!r} for ALLoRA; expected one of {_INITS}.")

    def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
        return lora_factors_init(rng, kernel, target)

    def delta(self, leaves: Leaves, target: Target) -> jax.Array:
        return leaves["a"] @ leaves["b"]

    def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        return (x @ leaves["a"]) @ leaves["b"]


class ScaleByALLoRAState(NamedTuple):
    """``scale_by_allora`` is stateless."""


def allora_row_scale(param: jax.Array, eta: float) -> jax.Array:
    """The factor ``1 / sqrt(||row||^2 + 1/eta^2)`` for every row (last axis) of ``param``, kept as an axis."""
    norm_sq = jnp.sum(jnp.square(param.astype(jnp.float32)), axis=-1, keepdims=True)
    return jax.lax.rsqrt(norm_sq + 1.0 / eta**2)


def scale_by_allora(eta: float) -> optax.GradientTransformation:
    """ALLoRA's per-row adaptive learning rate (see the module docstring).

    Args:
      eta: the factor at zero parameters (the largest effective learning-rate multiplier), > 0.

    Acts on every leaf it receives (wrap it in ``optax.masked`` to restrict it to the LoRA factors when
    the optimized tree holds other leaves). Needs ``params`` in ``update``.
    """
    if not eta > 0:
        raise ValueError(f"scale_by_allora: eta must be > 0, got {eta}.")

    def init_fn(params):
        del params
        return ScaleByALLoRAState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_allora needs the current params: call tx.update(grads, state, params).")
        scaled = jax.tree.map(lambda u, p: (u * allora_row_scale(p, eta)).astype(u.dtype), updates, params)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)
