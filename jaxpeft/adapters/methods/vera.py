"""VeRA: vector-based random matrix adaptation (frozen random projections, trained scaling vectors).

Paper: Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
arXiv:2310.11454. Reference implementation followed: Hugging Face PEFT ``peft/tuners/vera``
(``VeraModel._init_vera_A_vera_B``, ``_kaiming_init``, ``VeraLayer.update_layer / reset_vera_parameters``,
``Linear.get_delta_weight / forward``).

Math, on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W + bias``)::

    W' = W + (proj_a * d) @ (proj_b * b)        i.e.  Delta = A diag(d) B diag(b)
    proj_a: (d_in, r)   frozen, = PEFT ``vera_A[:, :d_in].T``
    proj_b: (r, d_out)  frozen, = PEFT ``vera_B[:d_out, :].T``
    d: (r,)  b: (d_out,)  trained (PEFT ``vera_lambda_d``, ``vera_lambda_b``)

There is no ``alpha / r`` scaling (as in the paper and PEFT); ``config.alpha`` is unused.
Activation-hook mode: ``y = x W + bias + ((x proj_a) * d) proj_b * b``.

Inits (``config.init``):
  * ``"default"`` (PEFT ``init_weights=True``): ``b = 0`` (so ``W' = W``), ``d = d_initial`` (option, 0.1).
  * ``"random"`` (PEFT ``init_weights=False``, for tests): ``b = 1``, ``d ~ N(0, 1)``.
  * Projections: PEFT's ``_kaiming_init`` (gain sqrt(2), torch fan-in = the tensor's second axis):
    ``vera_A (r, D_in) ~ U(+-sqrt(6 / D_in))`` and ``vera_B (D_out, r) ~ U(+-sqrt(6 / r))``, where
    ``(D_in, D_out)`` is the size of the shared matrices (below). Note the bound is ``sqrt(6/fan_in)``
    here, not LoRA's ``1/sqrt(fan_in)``.

Shared projections. PEFT keeps *one* pair ``vera_A (r, max d_in)``, ``vera_B (max d_out, r)`` for all adapted
layers (a buffer drawn from ``projection_prng_key``) and each layer uses its top-left slice. Here every
target stores its own slice as ``frozen_leaves`` (``proj_a``, ``proj_b``), drawn from the *same* key
``jax.random.key(projection_seed)`` (option, default 0) -- not from the per-target key -- with the shared
shape ``projection_shape = (D_in, D_out)`` (option) and then sliced, so all targets see slices of the same
two matrices, exactly PEFT's semantics. ``projection_shape=None`` (default) uses the target's own
``(d_in, d_out)``: identical projections for all targets of equal shape (the common case); for targets
of different shapes pass the elementwise maximum (PEFT's ``_find_dim``) to get PEFT's sharing and bounds.
Difference from PEFT: the slices are stored per target (memory and checkpoint size ``r (d_in + d_out)``
per target instead of once; PEFT's ``save_projection=True``, its default, also checkpoints them), and
the draws are JAX's, not ``torch.Generator``'s, so a PEFT checkpoint saved without projections cannot be
reproduced bit-exactly (load PEFT's ``vera_A/vera_B`` into ``proj_a/proj_b`` instead, transposed).
Stacked (scanned) layers share the projections too, as in PEFT.

Trainable parameters per adapted matrix: ``d_out + r`` (frozen, stored: ``r (d_in + d_out)``).
Merge: yes (additive); unmerge: exact up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method

_INITS = ("default", "random")


def _projection_shape(target: Target) -> tuple[int, int]:
    shape = target.option("projection_shape")
    return target.matrix_shape if shape is None else (int(shape[0]), int(shape[1]))


def shared_projections(target: Target) -> tuple[jax.Array, jax.Array]:
    """The target's slices ``(proj_a (d_in, r), proj_b (r, d_out))`` of the shared projections."""
    d_in, d_out = target.matrix_shape
    max_in, max_out = _projection_shape(target)
    r = target.rank
    key_a, key_b = jax.random.split(jax.random.key(target.option("projection_seed")))
    bound_a, bound_b = (6.0 / max_in) ** 0.5, (6.0 / r) ** 0.5
    proj_a = jax.random.uniform(key_a, (max_in, r), jnp.float32, -bound_a, bound_a)
    proj_b = jax.random.uniform(key_b, (r, max_out), jnp.float32, -bound_b, bound_b)
    return proj_a[:d_in], proj_b[:, :d_out]


@register_method("vera")
class VeRA(AdapterMethod):
    """``W' = W + (proj_a * d) @ (proj_b * b)`` with frozen shared projections. See the module docstring."""

    option_defaults = {"d_initial": 0.1, "projection_seed": 0, "projection_shape": None}
    frozen_leaves = frozenset({"proj_a", "proj_b"})

    def validate(self, target: Target) -> None:
        if target.fan_in_axes == 0:
            raise ValueError(f"{target.path}: VeRA needs a kernel with input and output axes; this leaf of "
                             f"per-layer shape {target.layer_shape} has none. Exclude it from the targets.")
        if target.init not in _INITS:
            raise ValueError(f"{target.path}: unknown VeRA init {target.init!r}; expected one of {_INITS}.")
        max_in, max_out = _projection_shape(target)
        d_in, d_out = target.matrix_shape
        if max_in < d_in or max_out < d_out:
            raise ValueError(f"{target.path}: options projection_shape={(max_in, max_out)} is smaller than this "
                             f"target's folded shape {(d_in, d_out)}; use the elementwise maximum over all targets.")

    def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
        proj_a, proj_b = shared_projections(target)
        d_out, r = target.matrix_shape[1], target.rank
        if target.init == "random":
            d = jax.random.normal(rng, (r,), jnp.float32)
            b = jnp.ones((d_out,), jnp.float32)
        else:
            d = jnp.full((r,), target.option("d_initial"), jnp.float32)
            b = jnp.zeros((d_out,), jnp.float32)
        return {"proj_a": proj_a, "proj_b": proj_b, "d": d, "b": b}

    def delta(self, leaves: Leaves, target: Target) -> jax.Array:
        return (leaves["proj_a"] * leaves["d"]) @ (leaves["proj_b"] * leaves["b"])

    def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        return (((x @ leaves["proj_a"]) * leaves["d"]) @ leaves["proj_b"]) * leaves["b"]
