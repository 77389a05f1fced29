"""SALT: scale and shift of the top singular values plus a low-rank update of the remaining ones.

Paper: Elsayed, Hashmi, Elseiagy, Wang, Yaqub, Almakky, "SALT: Singular Value Adaptation with Low-Rank
Transformation" (v2: "SALT: Parameter-Efficient Fine-Tuning via Singular Value Adaptation with Low-Rank
Transformation"), 2025, arXiv:2503.16055.
Reference implementation followed: BioMedIA-MBZUAI/SALT, ``prompt_adapted_SAM2/modeling/Adapters/SALT.py``
(``SALTLinear``); its defaults elsewhere in that repo: ``ratio_salt = 0.1``, ``r_lora = 256``.

Math. PyTorch orientation first (``W: (d_out, d_in)``, thin SVD ``W = U diag(σ) Vᵀ``, ``n = min(d_in, d_out)``,
``k = max(1, floor(ratio * n))``)::

    Σ' = [[diag(scale ⊙ σ_top + shift), 0                 ],      scale, shift: (k,)
          [0,                           diag(σ_tail) + X Y]]      X: (n-k, r),  Y: (r, n-k)
    W' = U ReLU(Σ') Vᵀ

The ReLU acts on the whole ``n x n`` core, so negative off-diagonal entries of ``X Y`` are clipped too
(as in the reference). On the folded Flax kernel ``K = Wᵀ = U_K diag(σ) V_Kᵀ`` (``U_K = V``, ``V_K = U``) the
same layer is ``K' = U_K ReLU(Σ')ᵀ V_Kᵀ``. jaxpeft computes it as ``K + U_K (ReLU(Σ')ᵀ - diag(σ)) V_Kᵀ``, which
equals ``K'`` up to the float32 rounding of the SVD and makes the init exactly the identity (``ReLU(Σ') =
diag(σ)`` at init) and merge / unmerge plain additions.

Leaves (per ``(d_in, d_out)`` matrix; torch names of ``SALTLinear`` in brackets):
  * frozen (``frozen_leaves``; computed once at init from the base kernel, stored and checkpointed, never
    trained): ``u: (d_in, n)`` = ``U_K`` [``Vt.T``], ``s: (n,)`` = σ [``S``], ``vt: (n, d_out)`` = ``V_Kᵀ`` [``U.T``].
  * trainable: ``scale: (k,)`` [``trainable_scale_A``], ``shift: (k,)`` [``trainable_shift_B``],
    ``x: (n-k, r)`` [``trainable_X``], ``y: (r, n-k)`` [``trainable_Y``]; ``r`` = ``config.rank``.

Init (reference): ``scale = 1``, ``shift = 0``, ``y = 0``, ``x`` from PyTorch ``kaiming_uniform_(a=sqrt(20),
mode="fan_in", nonlinearity="relu")``. With ``nonlinearity="relu"`` PyTorch ignores ``a`` (gain ``sqrt(2)``),
so ``x ~ U(-sqrt(6/r), sqrt(6/r))`` (fan-in of an ``(n-k, r)`` tensor is ``r``).

Trainable parameters per matrix: ``2k + 2r(n-k)``. Frozen storage: ``n (d_in + d_out + 1)``.

Regulariser (returned by the reference layer with the output, weighted by ``reg_multiplier`` in training,
default 0): ``‖diag(scale ⊙ σ_top + shift - σ_top)‖_F + ‖X Y‖_F`` per layer, summed over layers;
``regularizer(adapter_params)`` computes it from the adapter tree.

Options (``config.options``): ``ratio`` (the reference's ``ratio_salt``, default 0.1).
Deviations: the SVD is taken once at ``init`` (the reference re-takes it lazily at the first forward so it
sees loaded pretrained weights: here initialise the adapter after loading them); the signs of singular
vector pairs are LAPACK's, so ``X, Y`` live in the basis of *this* SVD. Conv kernels use the Flax fold
``(kh*kw*c_in, c_out)`` (reference: ``co (cin h w)``), i.e. the same matrix up to the order of its rows.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.canonical_dot import matmul


def _top_count(target: Target) -> int:
  """``k = max(1, floor(ratio * n))``."""
  return max(1, int(min(target.matrix_shape) * target.option("ratio")))


def _core_change(leaves: Leaves) -> jax.Array:
  """``ReLU(Σ')ᵀ - diag(σ)`` in the Flax (kernel) orientation, ``(n, n)``."""
  s = leaves["s"]
  k = leaves["scale"].shape[-1]
  core = jnp.diag(s).at[:k, :k].set(jnp.diag(leaves["scale"] * s[:k] + leaves["shift"]))
  core = core.at[k:, k:].add(leaves["x"] @ leaves["y"])
  return jax.nn.relu(core).T - jnp.diag(s)


@register_method("salt")
class SALT(AdapterMethod):
  """``K' = K + U_K (ReLU(Σ')ᵀ - diag σ) V_Kᵀ``. See the module docstring."""

  inits = ("default",)
  needs_matrix = True

  option_defaults = {"ratio": 0.1}
  frozen_leaves = frozenset({"u", "s", "vt"})

  def validate(self, target: Target) -> None:
    ratio = target.option("ratio")
    if not 0.0 < ratio <= 1.0:
      raise ValueError(f"{target.path}: SALT option ratio must be in (0, 1], got {ratio!r}.")

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    u, s, vt = jnp.linalg.svd(kernel, full_matrices=False)
    n, k, r = s.shape[0], _top_count(target), target.rank
    bound = math.sqrt(6.0 / r)
    return {
        "u": u,
        "s": s,
        "vt": vt,
        "scale": jnp.ones((k,), jnp.float32),
        "shift": jnp.zeros((k,), jnp.float32),
        "x": jax.random.uniform(rng, (n - k, r), jnp.float32, -bound, bound),
        "y": jnp.zeros((r, n - k), jnp.float32),
    }

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return (leaves["u"] @ _core_change(leaves)) @ leaves["vt"]

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return matmul(matmul(matmul(x, leaves["u"]), _core_change(leaves)), leaves["vt"])

  def loss_term(self, config: Any, *, reg_multiplier: float):
    """``reg_multiplier * regularizer(adapter_params)`` (``penalty.reg_multiplier``; reference default 0)."""
    if not reg_multiplier >= 0:
      raise ValueError(f"SALT's penalty reg_multiplier={reg_multiplier} must be >= 0.")
    return lambda base_params, adapter_params, rng: reg_multiplier * regularizer(adapter_params)


def _layer_regularizer(leaves: Leaves) -> jax.Array:
  k = leaves["scale"].shape[-1]
  top = leaves["s"][:k]
  return jnp.linalg.norm(leaves["scale"] * top + leaves["shift"] - top) + jnp.linalg.norm(
      leaves["x"] @ leaves["y"]
  )


def regularizer(adapter_params: Any) -> jax.Array:
  """The reference's SALT regulariser summed over all adapted layers (stacked layers included).

  Add ``reg_multiplier * regularizer(adapter_params)`` to the training loss (reference default weight 0).
  """
  by_path: dict[str, Leaves] = {}
  for key, value in traverse_util.flatten_dict(adapter_params, sep="/").items():
    path, _, name = key.rpartition("/")
    by_path.setdefault(path, {})[name] = value
  total = jnp.zeros((), jnp.float32)
  for path, leaves in by_path.items():
    if set(leaves) != {"u", "s", "vt", "scale", "shift", "x", "y"}:
      raise ValueError(f"regularizer expects SALT adapter params; {path!r} has leaves {sorted(leaves)}.")
    per_layer = _layer_regularizer
    for _ in range(leaves["scale"].ndim - 1):  # stacked (scanned) layers
      per_layer = jax.vmap(per_layer)
    total = total + jnp.sum(per_layer(leaves))
  return total
