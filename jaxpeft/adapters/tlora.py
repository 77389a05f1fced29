"""TLoRA: transform adaptation (tensor-train matrix) of the pretrained weight plus a tensor-ring residual.

Paper: Tao, Takida, Murata, Zhao, Mitsufuji, "Transformed Low-rank Adaptation via Tensor Decomposition and Its
Applications to Text-to-image Models", 2025, arXiv:2501.08727 (no code released). Tensor formats: Oseledets,
"Tensor-Train Decomposition", SIAM J. Sci. Comput. 2011 (TT-matrix / MPO); Zhao et al., "Tensor Ring
Decomposition", 2016, arXiv:1606.05535.

Idea (paper): ``W' = W_0 T + Delta W`` -- a learnable, full-rank, dense *transform* of the pretrained weight
that aligns it with the target so that the remaining *residual* needs less rank, both parameterised by tensor
decompositions for parameter efficiency (DoRA is the special case "T diagonal, Delta W low rank").

Implemented form [reconstructed: the paper's text beyond its abstract, and any code, were not readable here;
this follows the construction summarised in shared/research/adapters.md 1.12], on the folded Flax kernel
``K: (d_in, d_out)`` (PyTorch ``W_0 = Kᵀ``, so ``W_0 T`` is ``Tᵀ K``; we parameterise ``T_f = Tᵀ`` directly)::

    K' = T_f K + s * R,          s = alpha / r
    T_f = I + TT(G_1, ..., G_D)  d_in x d_in TT-matrix:
                                 TT[(i_1..i_D), (j_1..j_D)] = G_1[:, i_1, j_1, :] ... G_D[:, i_D, j_D, :]
                                 G_d: (t_{d-1}, n_d, n_d, t_d),  t_0 = t_D = 1,  t_d = transform_rank
    R   = TR(H_1, ..., H_D)      d_in x d_out tensor-ring matrix:
                                 R[(i_1..i_D), (j_1..j_D)] = trace(H_1[:, i_1, j_1, :] ... H_D[:, i_D, j_D, :])
                                 H_d: (r, p_d, q_d, r),  r = config.rank

with ``d_in = n_1 ... n_D = p_1 ... p_D`` (the same modes, ``n_d = p_d``) and ``d_out = q_1 ... q_D``; row and
column multi-indices are row-major (``i_1`` slowest). The modes come from ``options["in_modes"]`` /
``options["out_modes"]`` or, by default, from a balanced split of each size into ``order`` factors.
Any folded kernel works: the core folds a Flax conv kernel ``(kh, kw, I, O)`` to ``(kh*kw*I, O)``, which is
PyTorch's ``W_t.permute(0, 2, 3, 1).reshape(O, -1)`` transposed (``W_t: (O, I, kh, kw)``), so ``T_f`` mixes
kernel taps and input channels.

Init: ``G_d ~ N(0, 1/t_{d-1})`` and ``H_d ~ N(0, 1/r)`` (each partial product keeps unit entry variance), with the
last cores ``G_D = 0`` and ``H_D = 0``, so ``T_f = I``, ``R = 0`` and ``K' = K`` at init (``init="random"`` draws
the last cores too; tests).
Param count: ``sum_d t_{d-1} n_d^2 t_d + sum_d r^2 p_d q_d``.
Merge: ``K'`` is dense. Unmerge: ``K = T_f^{-1} (K' - s R)`` (a linear solve; ``T_f`` is invertible near ``I``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method

_INITS = ("default", "random")


def balanced_modes(n: int, order: int) -> tuple[int, ...]:
    """``n`` split into ``order`` factors (prime factors, largest first, each to the smallest bucket), descending."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    buckets = [1] * order
    for prime in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= prime
    return tuple(sorted(buckets, reverse=True))


def modes(target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in_modes, out_modes)`` for the folded ``(d_in, d_out)`` kernel."""
    d_in, d_out = target.matrix_shape
    order = target.option("order")
    in_modes = tuple(target.option("in_modes") or balanced_modes(d_in, order))
    out_modes = tuple(target.option("out_modes") or balanced_modes(d_out, order))
    return in_modes, out_modes


def _core_shapes(target: Target) -> dict[str, tuple[int, ...]]:
    in_modes, out_modes = modes(target)
    depth, t, r = len(in_modes), target.option("transform_rank"), target.rank
    ranks = [1] + [t] * (depth - 1) + [1]
    shapes = {f"transform_{d}": (ranks[d], n, n, ranks[d + 1]) for d, n in enumerate(in_modes)}
    shapes.update({f"residual_{d}": (r, p, q, r) for d, (p, q) in enumerate(zip(in_modes, out_modes))})
    return shapes


def _contract(cores: list[jax.Array]) -> jax.Array:
    """Product of TT/TR-matrix cores ``(a, p, q, b)`` -> ``(a_0, prod p, prod q, b_D)`` (row-major multi-indices)."""
    out = cores[0]
    for core in cores[1:]:
        a, rows, cols, _ = out.shape
        _, p, q, b = core.shape
        out = jnp.einsum("aijc,cpqb->aipjqb", out, core).reshape(a, rows * p, cols * q, b)
    return out


def transform(leaves: Leaves, target: Target) -> jax.Array:
    """``T_f = I + TT(G)``, shape ``(d_in, d_in)``."""
    depth = len(modes(target)[0])
    tt = _contract([leaves[f"transform_{d}"] for d in range(depth)])[0, :, :, 0]
    return jnp.eye(tt.shape[0], dtype=tt.dtype) + tt


def residual(leaves: Leaves, target: Target) -> jax.Array:
    """``s * TR(H)``, shape ``(d_in, d_out)``."""
    depth = len(modes(target)[0])
    ring = _contract([leaves[f"residual_{d}"] for d in range(depth)])
    return target.scaling * jnp.einsum("aija->ij", ring)


@register_method("tlora")
class TLoRA(AdapterMethod):
    """``K' = (I + TT(G)) K + s TR(H)``. See the module docstring."""

    option_defaults = {"order": 3, "transform_rank": 4, "in_modes": None, "out_modes": None}

    def validate(self, target: Target) -> None:
        if target.fan_in_axes == 0:
            raise ValueError(f"{target.path}: TLoRA needs a kernel with input and output axes, got per-layer shape "
                             f"{target.layer_shape} with fan_in_axes=0. Exclude it from AdapterConfig.targets.")
        if target.init not in _INITS:
            raise ValueError(f"{target.path}: unknown init {target.init!r} for TLoRA; expected one of {_INITS}.")
        order, t = target.option("order"), target.option("transform_rank")
        if not (isinstance(order, int) and order >= 1 and isinstance(t, int) and t >= 1):
            raise ValueError(f"{target.path}: TLoRA options order and transform_rank must be positive ints, got "
                             f"order={order!r}, transform_rank={t!r}.")
        (d_in, d_out), (in_modes, out_modes) = target.matrix_shape, modes(target)
        if math.prod(in_modes) != d_in or math.prod(out_modes) != d_out or len(in_modes) != len(out_modes):
            raise ValueError(f"{target.path}: TLoRA modes must multiply to the folded kernel shape ({d_in}, {d_out}) "
                             f"and have equal lengths, got in_modes={in_modes}, out_modes={out_modes}.")

    def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
        shapes = _core_shapes(target)
        depth = len(shapes) // 2
        leaves = {}
        for key, (name, shape) in zip(jax.random.split(rng, len(shapes)), sorted(shapes.items())):
            last = name.endswith(f"_{depth - 1}")
            if last and target.init != "random":
                leaves[name] = jnp.zeros(shape, jnp.float32)
            else:
                leaves[name] = jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(shape[0])
        return leaves

    def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        return transform(leaves, target) @ kernel + residual(leaves, target)

    def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        return jnp.linalg.solve(transform(leaves, target), merged - residual(leaves, target))
