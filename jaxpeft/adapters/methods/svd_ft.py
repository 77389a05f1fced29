"""Singular-value fine-tuning (CLIP-SVD): a full SVD of the base weight at init, only the singular values trained.

Paper: Koleilat, Rivaz, Xiao, "Singular Value Few-shot Adaptation of Vision-Language Models", 2025,
arXiv:2509.03740. Reference implementation followed: HealthX-Lab/CLIP-SVD (``svf_utils/svf_torch.py``:
``SVD_Linear`` = ``fc_U(vector_S * fc_V(x))`` from a full-rank (``global_rank_ratio = 1.0``) SVD;
``svf_utils/utils.py``: only ``vector_S`` has ``requires_grad``).

Math, on the folded ``(d_in, d_out)`` kernel ``W = U diag(σ₀) Vᵀ`` (thin SVD, ``n = min(d_in, d_out)``)::

    W' = U diag(σ) Vᵀ = W + U diag(σ - σ₀) Vᵀ,       σ: (n,) trainable, initialised to σ₀

jaxpeft computes the right-hand form: it equals the reference's ``U diag(σ) Vᵀ`` up to the float32 rounding
of the SVD, makes the init exactly the identity (``σ = σ₀``), and merge / unmerge plain additions.

Leaves (per matrix): trainable ``s: (n,)`` (reference ``vector_S``); frozen (``frozen_leaves``: computed once
at init from the base kernel, stored and checkpointed, never trained) ``u: (d_in, n)``, ``vt: (n, d_out)``
(in PyTorch orientation the reference's ``fc_V.weight = Vᵀ`` is our ``u.T`` and ``fc_U.weight = U`` is our
``vt.T``) and ``s0: (n,)`` (σ₀).

Trainable parameters per matrix: ``n = min(d_in, d_out)``. Frozen storage: ``n (d_in + d_out + 1)``.
Which layers to adapt (q/k/v/out/MLP of both CLIP towers, layer ranges) is the target regex's job; CLIP's
fused ``in_proj`` must be a separate q/k/v kernel (or a DenseGeneral folded per head) to match the reference.
Deviation: the SVD is taken once at ``init``; initialise the adapter after loading the pretrained weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.canonical_dot import matmul


@register_method("svd_ft")
class SingularValueFineTuning(AdapterMethod):
  """``W' = W + U diag(σ - σ₀) Vᵀ`` with only ``σ`` trained. See the module docstring."""

  inits = ("default",)
  needs_matrix = True

  frozen_leaves = frozenset({"u", "vt", "s0"})
  no_decay_leaves = frozenset({"s"})  # the reference trains vector_S without weight decay

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    u, s, vt = jnp.linalg.svd(kernel, full_matrices=False)
    return {"u": u, "vt": vt, "s0": s, "s": s}

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return (leaves["u"] * (leaves["s"] - leaves["s0"])) @ leaves["vt"]

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return matmul(matmul(x, leaves["u"]) * (leaves["s"] - leaves["s0"]), leaves["vt"])
