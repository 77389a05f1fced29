"""Hydra: a parallel (LoRA-like) and a sequential low-rank branch on one linear layer, mergeable.

Paper: Kim, Yang, Kim, Hong, Park, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning", 2023, arXiv:2309.06922. Reference implementation followed: the authors' extremebird/Hydra
(``vtab1k/hydra.py``: ``Hydra_layer``, ``forward_vit_hydra_ffn``, ``reparameterize``).

Math, on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W + b``)::

    y' = x W + b + s * (x a_p) b_p + s * ((x W) a_s) b_s                      (two branches)
    W' = W + s * (a_p b_p + W a_s b_s)                                          (merged)

    a_p: (d_in, r)   parallel down-projection, reads the layer input   (torch: hydra_*_par.down_proj.weight.T)
    b_p: (r, d_out)  parallel up-projection                             (torch: hydra_*_par.up_proj.weight.T)
    a_s: (d_out, r)  sequential down-projection, reads the base output  (torch: hydra_*_seq.down_proj.weight.T)
    b_s: (r, d_out)  sequential up-projection                           (torch: hydra_*_seq.up_proj.weight.T)

``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); the reference's free ``scale`` hyperparameter is
``alpha / r``, so set ``alpha = scale * rank`` (reference default ``scale = 1``: ``alpha = rank``).

Init (as the reference ``Hydra_layer``): down-projections Xavier-uniform, ``U(-c, c)`` with
``c = sqrt(6 / (fan_in + fan_out))`` (``a_p``: ``fan_in + fan_out = d_in + r``; ``a_s``: ``d_out + r``);
up-projections zero, so ``W' = W`` exactly at init.

Trainable parameters per ``(d_in, d_out)`` matrix: ``r (d_in + d_out) + 2 r d_out``; no frozen leaves.
Merge: yes (above). Unmerge: ``W = (W' - s a_p b_p) (I + s a_s b_s)^{-1}`` needs the inverse of a
``d_out x d_out`` matrix (Woodbury: ``I - s a_s (I_r + s b_s a_s)^{-1} b_s``, an ``r x r`` solve), which
exists unless ``-1/s`` is an eigenvalue of ``b_s a_s``.

Deviation from the reference code (why): its ``nn.Linear`` branches carry biases (down and up), and its
sequential branch reads the base output *including* the base bias ``b``, so its merged bias is
``b + s (b a_s b_s + bias terms of the branches)``. A jaxpeft method adapts one kernel leaf and never sees
the bias leaf, so here the branches are bias-free and the sequential branch reads ``x W`` (the bias-free
form ``W + s(B_p A_p + B_s A_s W)`` in PyTorch orientation). The difference is a constant output shift
``s b a_s b_s`` (plus the reference's zero-initialised branch biases); train the layer's bias (BitFit) to
recover that freedom. Trainable count differs from the reference by its ``2 r + 2 d_out`` bias terms.

Activation-hook mode (``jaxpeft.adapters.factored``): ``branch`` returns
``s (x a_p) b_p + s ((x W) a_s) b_s`` without forming the ``(d_in, d_out)`` update (``branch`` does not
receive the base output, so ``x W`` is computed a second time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method


def _xavier_uniform(rng: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
    """PyTorch ``xavier_uniform_`` for a ``(fan_out, fan_in)`` weight, returned transposed ``(fan_in, fan_out)``."""
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(rng, (fan_in, fan_out), jnp.float32, -bound, bound)


@register_method("hydra")
class Hydra(AdapterMethod):
    """``W' = W + s (a_p b_p + W a_s b_s)``. See the module docstring."""

    def validate(self, target: Target) -> None:
        if target.fan_in_axes == 0:
            raise ValueError(f"{target.path}: Hydra needs a kernel with input and output axes, but this leaf of "
                             f"per-layer shape {target.layer_shape} has none (fan_in_axes=0). Exclude it from "
                             "AdapterConfig.targets.")
        if target.init != "default":
            raise ValueError(f"{target.path}: Hydra has only init='default' (Xavier-uniform down-projections, "
                             f"zero up-projections), got {target.init!r}.")

    def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
        d_in, d_out = target.matrix_shape
        r = target.rank
        key_p, key_s = jax.random.split(rng)
        return {"a_p": _xavier_uniform(key_p, d_in, r), "b_p": jnp.zeros((r, d_out), jnp.float32),
                "a_s": _xavier_uniform(key_s, d_out, r), "b_s": jnp.zeros((r, d_out), jnp.float32)}

    def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        s = target.scaling
        return kernel + s * (leaves["a_p"] @ leaves["b_p"]) + s * ((kernel @ leaves["a_s"]) @ leaves["b_s"])

    def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        s = target.scaling
        a_s, b_s = leaves["a_s"], leaves["b_s"]
        without_parallel = merged - s * (leaves["a_p"] @ leaves["b_p"])
        # (I + s a_s b_s)^{-1} = I - s a_s (I_r + s b_s a_s)^{-1} b_s   (Woodbury)
        small = jnp.eye(target.rank, dtype=jnp.float32) + s * (b_s @ a_s)
        return without_parallel - s * ((without_parallel @ a_s) @ jnp.linalg.solve(small, b_s))

    def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        s = target.scaling
        return s * ((x @ leaves["a_p"]) @ leaves["b_p"]) + s * (((x @ kernel) @ leaves["a_s"]) @ leaves["b_s"])
