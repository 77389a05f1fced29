"""RandLoRA: full-rank updates from scaled sums of frozen random low-rank bases.

Paper: Albert, Zhang, Saratchandran, Rodriguez-Opazo, van den Hengel, Abbasnejad, "RandLoRA: Full-rank
parameter-efficient fine-tuning of large models", ICLR 2025, arXiv:2502.00987 (authors' code: PaulAlbert31/RandLoRA). Reference implementation
followed: Hugging Face PEFT ``peft/tuners/randlora`` (``RandLoraModel._init_randlora_A_randlora_B(_sparse)``,
``RandLoraLayer.update_layer``, ``Linear.get_scaled_bases / get_delta_weight``), PEFT 0.21.2.

Math, for a folded ``(d_in, d_out)`` kernel with ``n = min(d_in, d_out)``, ``D = max(d_in, d_out)``,
``N = ceil(n / r)`` bases (so ``N r >= n``: the update can be full rank)::

    basis_a: (r, n)       frozen, shared by the N terms   (PEFT ``randlora_A[:, 0, :n]``)
    basis_b: (D, N, r)    frozen                          (PEFT ``randlora_B[:D, :N, :]``)
    lam: (r, N), gamma: (N, n)  trained                    (PEFT ``randlora_lambda``, ``randlora_gamma``)
    A_flat[j*N + i, :] = lam[j, i] * basis_a[j, :] * gamma[i, :]          (r*N, n)
    B_flat[:, i*r + j] = basis_b[:, i, j]                                  (D, N*r)
    M = B_flat @ A_flat   (D, n);   Delta = s * (M.T if d_in <= d_out else M),   s = alpha / r

The trained scalings sit on the smaller side ``n``. The pairing of the flattened indices (``j*N + i`` in
``A_flat`` against ``i*r + j`` in ``B_flat``) is PEFT's, kept so PEFT checkpoints load unchanged; with
random bases it is one more fixed permutation of the basis columns. Scaling: PEFT's ``s = alpha / r``
(its default ``randlora_alpha = 640``); the authors' code uses ``alpha / (r sqrt(N))`` -- we follow PEFT.

Inits: ``"default"``: ``lam = 0`` (``W' = W``), ``gamma = 1 / max(N, n)`` (PEFT); ``"random"`` (tests):
``lam ~ N(0, 1)``. Bases (option ``basis``): ``"dense"`` (PEFT default): uniform, then divided by the sample
std of the whole matrix; ``"sparse"`` / ``"very_sparse"``: ternary ``{-1, 0, 1}`` with ``P(+-1) = 1/(2 s)``,
``s = 3`` resp. ``sqrt(min side of the shared shape)``, then divided by the sample std (PEFT's
``sparse``/``very_sparse``).

Shared bases: as PEFT (one buffer pair sliced per layer), drawn from ``jax.random.key(projection_seed)``
with the shared shape ``projection_shape = (D_in, D_out)`` (option; ``None``: the target's own shape) and
stored per target as ``frozen_leaves`` -- see ``jaxpeft.adapters.methods.vera`` for the same design and its
difference from PEFT's single buffer (per-target storage; JAX draws, not ``torch.Generator``'s).

Trainable parameters per adapted matrix: ``N r + N n`` (``N = ceil(n/r)``; about ``n + n^2/r``: a *smaller*
rank trains *more* parameters). Frozen, stored: ``r n + D N r``. Merge: yes; unmerge: exact up to rounding.
Not implemented: dropout on the branch (reparameterized mode only). ``jax.checkpoint`` recomputes the
``(r, N, n)`` scaled basis in the backward pass instead of storing it (PEFT's ``UniqueBaseGrad``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.methods.vera import single_rank, with_projection_shape
from jaxpeft.adapters.peft_mapping import Layout, PeftMapping, Rule, peft_alpha, same

_INITS = ("default", "random")
_BASES = ("dense", "sparse", "very_sparse")


def _dims(shape: tuple[int, int], rank: int) -> tuple[int, int, int]:
  """``(n, D, N)`` for a ``(d_in, d_out)`` shape."""
  n, big = min(shape), max(shape)
  return n, big, math.ceil(n / rank)


def _draw(key: jax.Array, shape: tuple[int, ...], basis: str, min_side: int) -> jax.Array:
  if basis == "dense":
    m = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
  else:
    sparsity = 3.0 if basis == "sparse" else math.sqrt(min_side)
    u = jax.random.uniform(key, shape, jnp.float32)
    m = jnp.where(u < 1 / (2 * sparsity), -1.0, jnp.where(u > 1 - 1 / (2 * sparsity), 1.0, 0.0))
  return m / jnp.std(m, ddof=1)


def shared_bases(target: Target) -> tuple[jax.Array, jax.Array]:
  """The target's slices ``(basis_a (r, n), basis_b (D, N, r))`` of the shared random bases."""
  shape = target.option("projection_shape")
  shared = target.matrix_shape if shape is None else (int(shape[0]), int(shape[1]))
  r, basis = target.rank, target.option("basis")
  n_max, big_max, bases_max = _dims(shared, r)
  key_a, key_b = jax.random.split(jax.random.key(target.option("projection_seed")))
  basis_a = _draw(key_a, (r, n_max), basis, n_max)
  basis_b = _draw(key_b, (big_max, bases_max, r), basis, n_max)
  n, big, num = _dims(target.matrix_shape, r)
  return basis_a[:, :n], basis_b[:big, :num]


@jax.checkpoint
def _product(basis_a: jax.Array, basis_b: jax.Array, lam: jax.Array, gamma: jax.Array) -> jax.Array:
  a_flat = (lam[:, :, None] * basis_a[:, None, :] * gamma[None]).reshape(-1, basis_a.shape[1])
  return basis_b.reshape(basis_b.shape[0], -1) @ a_flat


# PEFT RandLoraConfig: lam -> randlora_lambda, gamma -> randlora_gamma; shared: basis_a is
# base_model.randlora_A[:, 0, :n] (r, 1, n_max), basis_b is base_model.randlora_B[:D, :N] (D_max, N_max, r).
def _randlora_rules(layout: Layout, target: Target | None) -> dict[str, Rule]:
  return {
      "basis_a": Rule("randlora_A", lambda x: x[:, None, :], shared=True),
      "basis_b": Rule("randlora_B", same, shared=True),
      "lam": Rule("randlora_lambda", same),
      "gamma": Rule("randlora_gamma", same),
  }


def _randlora_config_fields(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict:
  alphas = {peft_alpha(t.alpha, t.rank, t.use_rslora, False) for t in targets}
  single_rank("randlora", targets, alphas)
  basis = dict(targets[0].options)["basis"]
  return {
      "r": targets[0].rank,
      "save_projection": True,
      "init_weights": True,
      "projection_prng_key": 0,
      "randlora_alpha": alphas.pop(),
      "randlora_dropout": config.dropout,
      "sparse": basis == "sparse",
      "very_sparse": basis == "very_sparse",
  }


def _randlora_options(peft_config: Mapping[str, Any], *_: Any) -> dict[str, Any]:
  return {
      "basis": (
          "very_sparse" if peft_config.get("very_sparse") else "sparse" if peft_config.get("sparse") else "dense"
      )
  }


def _randlora_shared_shapes(targets: Sequence[Target]) -> dict[str, tuple[int, ...]]:
  """PEFT sizes its buffers from the largest in/out dimensions separately (``_find_dim``)."""
  max_in, max_out = max(t.matrix_shape[0] for t in targets), max(t.matrix_shape[1] for t in targets)
  r, n = targets[0].rank, min(max_in, max_out)
  return {"randlora_A": (r, 1, n), "randlora_B": (max(max_in, max_out), math.ceil(n / r), r)}


_PEFT = PeftMapping(
    "RANDLORA",
    ("linear",),
    _randlora_rules,
    _randlora_config_fields,
    _randlora_options,
    alpha_field="randlora_alpha",
    dropout_field="randlora_dropout",
    shared_shapes=_randlora_shared_shapes,
    layer_copies_of_shared=True,
    complete_options=with_projection_shape,
)


@register_method("randlora")
class RandLoRA(AdapterMethod):
  """``W' = W + s * sum_i B_i diag(lam_i) A diag(gamma_i)`` (frozen shared bases). See the module docstring."""

  peft = _PEFT

  inits = _INITS
  needs_matrix = True

  option_defaults = {"projection_seed": 0, "projection_shape": None, "basis": "dense"}
  frozen_leaves = frozenset({"basis_a", "basis_b"})

  def validate(self, target: Target) -> None:
    if target.option("basis") not in _BASES:
      raise ValueError(f"{target.path}: options basis={target.option('basis')!r}; expected one of {_BASES}.")
    shape = target.option("projection_shape")
    if shape is not None and (shape[0] < target.matrix_shape[0] or shape[1] < target.matrix_shape[1]):
      raise ValueError(
          f"{target.path}: options projection_shape={tuple(shape)} is smaller than this "
          f"target's folded shape {target.matrix_shape}; use the elementwise maximum."
      )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    basis_a, basis_b = shared_bases(target)
    n, _, num = _dims(target.matrix_shape, target.rank)
    lam = (
        jax.random.normal(rng, (target.rank, num), jnp.float32)
        if target.init == "random"
        else jnp.zeros((target.rank, num), jnp.float32)
    )
    gamma = jnp.full((num, n), 1.0 / max(num, n), jnp.float32)
    return {"basis_a": basis_a, "basis_b": basis_b, "lam": lam, "gamma": gamma}

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    m = _product(leaves["basis_a"], leaves["basis_b"], leaves["lam"], leaves["gamma"])
    d_in, d_out = target.matrix_shape
    return target.scaling * (m.T if d_in <= d_out else m)
