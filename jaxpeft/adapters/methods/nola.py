"""NOLA: LoRA factors as linear combinations of frozen random bases; only the coefficients are trained.

Paper: Koohpayegani, Navaneet, Nooralinejad, Kolouri, Pirsiavash, "NOLA: Compressing LoRA using Linear
Combination of Random Basis", ICLR 2024, arXiv:2310.02556. Reference implementation followed: the
authors' UCDvision/NOLA, LLaMA variant (``llama/peft/tuners/lora.py``: ``NOLALinear``, ``GenerateParams``,
``LoraLayer.update_layer / reset_lora_parameters`` with ``use_nola=True``). Hugging Face PEFT has no NOLA;
the tests check this formula in numpy.

Math, on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W + bias``)::

    A = A0 + sum_{i=1}^{k_a} alpha_i A_i        A0, A_i: (d_in, r)
    B =      sum_{j=1}^{k_b} beta_j  B_j        B_j:     (r, d_out)
    W' = W + s * A @ B,                          s = alpha / r  (alpha / sqrt(r) with use_rslora)

Frozen randomness, as in the reference: ``A_i, B_j ~ U(-1, 1) / sqrt(k)`` (``k`` = that factor's number of
bases), ``A0 ~ U(+-1/sqrt(d_in))`` (the reference's ``lora_A`` weight, PyTorch's ``kaiming_uniform_(a=sqrt(5))``,
frozen), and the reference's frozen ``lora_B`` weight is zero, so it is dropped from ``B``. Trained:
``alpha: (k_a,)``, ``beta: (k_b,)`` (options ``num_basis_a``, ``num_basis_b``; the reference's
``nola_num_basis`` default is 128 for both).

Init (``config.init``): ``"default"``: ``alpha = beta = 0`` (reference), so ``B = 0`` and ``W' = W``; since
``A = A0 != 0``, ``beta`` gets a gradient from the first step. ``"random"``: ``alpha, beta ~ N(0, 1)`` (tests).

Storage. The bases are never stored: they are regenerated from a per-layer seed, kept as the frozen leaf
``seed`` (a float32 scalar holding an integer below 2^24, drawn from the init key, so stacked layers get
different bases; float so that the adapter tree stays differentiable as a whole). The reference does the
same with a ``torch.manual_seed`` per matrix, but its PyTorch draws cannot be reproduced in JAX.
``jax.checkpoint`` around the generation and contraction makes the backward pass regenerate the bases
instead of keeping them (the reference's custom autograd ``GenerateParams`` does the same).

Trainable parameters per adapted matrix: ``k_a + k_b`` (independent of shape and rank); frozen: 1 (seed).
Merge: yes; unmerge: exact up to rounding. Activation-hook mode: ``s * (x A) B``.
Deviation from the reference: it uses one ``nola_num_basis`` for both factors; here ``k_a`` and ``k_b`` can
differ (set both to the same value to match).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.canonical_dot import matmul

_INITS = ("default", "random")
_SEED_RANGE = 2**24  # integers exactly representable in float32


def nola_bases(seed: jax.Array, target: Target) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(A0 (d_in, r), A_i (k_a, d_in, r), B_j (k_b, r, d_out))`` regenerated from a ``seed`` leaf."""
  d_in, d_out = target.matrix_shape
  r, k_a, k_b = target.rank, target.option("num_basis_a"), target.option("num_basis_b")
  key_0, key_a, key_b = jax.random.split(jax.random.key(seed.astype(jnp.uint32)), 3)
  bound = 1.0 / d_in**0.5
  a0 = jax.random.uniform(key_0, (d_in, r), jnp.float32, -bound, bound)
  basis_a = jax.random.uniform(key_a, (k_a, d_in, r), jnp.float32, -1.0, 1.0) / k_a**0.5
  basis_b = jax.random.uniform(key_b, (k_b, r, d_out), jnp.float32, -1.0, 1.0) / k_b**0.5
  return a0, basis_a, basis_b


def _factors(leaves: Leaves, target: Target) -> tuple[jax.Array, jax.Array]:
  @jax.checkpoint
  def build(seed, alpha, beta):
    a0, basis_a, basis_b = nola_bases(seed, target)
    return a0 + jnp.tensordot(alpha, basis_a, 1), jnp.tensordot(beta, basis_b, 1)

  return build(leaves["seed"], leaves["alpha"], leaves["beta"])


@register_method("nola")
class NOLA(AdapterMethod):
  """``W' = W + s (A0 + sum alpha_i A_i)(sum beta_j B_j)`` with seeded random bases. See the module docstring."""

  inits = _INITS
  needs_matrix = True

  option_defaults = {"num_basis_a": 128, "num_basis_b": 128}
  frozen_leaves = frozenset({"seed"})

  def validate(self, target: Target) -> None:
    for name in ("num_basis_a", "num_basis_b"):
      if not isinstance(target.option(name), int) or target.option(name) < 1:
        raise ValueError(f"{target.path}: options {name} must be a positive int, got {target.option(name)!r}.")

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    key_seed, key_a, key_b = jax.random.split(rng, 3)
    k_a, k_b = target.option("num_basis_a"), target.option("num_basis_b")
    seed = jax.random.randint(key_seed, (), 0, _SEED_RANGE).astype(jnp.float32)
    if target.init == "random":
      alpha = jax.random.normal(key_a, (k_a,), jnp.float32)
      beta = jax.random.normal(key_b, (k_b,), jnp.float32)
    else:
      alpha, beta = jnp.zeros((k_a,), jnp.float32), jnp.zeros((k_b,), jnp.float32)
    return {"seed": seed, "alpha": alpha, "beta": beta}

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    a, b = _factors(leaves, target)
    return target.scaling * (a @ b)

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    a, b = _factors(leaves, target)
    return matmul(matmul(x, a) * target.scaling, b)
