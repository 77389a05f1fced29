"""ALLoRA: LoRA without dropout and without the alpha/r scale, with a per-output-row adaptive gradient scale.

Paper: Huang, Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", 2024, arXiv:2410.09692
(ICLR 2025 submission, OpenReview 7X65yoKl3Y). No reference implementation has been published.
Source of the update rule [secondary]: the paper's Sec. 4 (Definition and "one more implementation detail"
paragraph) could not be read here; the rule below is the one two independent readings of it agree on: an
implementation whose docstring transcribes Sec. 4.2 (``g~_i = g_i / sqrt(||(BA)_{i,:}|| + 1/eta^2)``, rows of
``BA``, gradient to the layer input untouched) and an OpenReview review quoting the paper ("a function that is
inversely proportional to ``||(BA)_{i,:}||``"); third-party optimizers citing the paper use the same
``1 / sqrt(||.|| + 1/eta^2)`` form (with the norm not squared). See shared/research/adapters.md 1.10.

Math, in PyTorch layout (``W: (d_out, d_in)``, ``B: (d_out, r)``, ``A: (r, d_in)``)::

    y = (W + B A) x                                    (no alpha/r factor, no dropout)
    c_i = 1 / sqrt(||(B A)_{i,:}||_2 + 1 / eta^2)      one factor per output unit i (row of B A)
    backward: the gradient reaching the update, G = dL/d(B A), becomes diag(c) G before it is passed to A and B:
        dA = Bᵀ diag(c) G,   dB = diag(c) G Aᵀ;   the gradient to the input x (and to W) is unchanged.

At ``B A = 0`` (LoRA's init) ``c = eta``: a large step that lets ``B`` leave zero quickly, shrinking like
``1 / sqrt(||row||)`` as the update grows. ``c`` depends on the parameters only, so scaling the summed
gradient equals scaling every per-sample gradient, as the paper states. It is part of the adapter's
differentiation (a ``jax.custom_vjp``), so any optimizer (SGD, Adam, ...) receives the rescaled gradients;
there is no separate optimizer transform.

Flax layout: the folded kernel is ``K = Wᵀ: (d_in, d_out)``, the leaves are ``a = Aᵀ: (d_in, r)`` and
``b = Bᵀ: (r, d_out)``, ``K' = K + a b``; the rows of ``B A`` are the columns of ``a b``, whose norms are computed
without materialising ``a b``: ``||(a b)_{:,j}||^2 = b_jᵀ (aᵀ a) b_j``.
``options={"eta": ...}`` is required (the paper gives no default). Init as LoRA's default (``a ~ U(-1/sqrt(d_in),
1/sqrt(d_in))``, ``b = 0``; ``config.init`` "gaussian" and "random" as in ``jaxpeft.adapters.methods.lora``), so ``K' = K``
at init. ``config.alpha`` is ignored; a non-zero ``config.dropout`` is an error. Trainable parameters per matrix:
``r (d_in + d_out)``. Mergeable (``a b`` is a plain LoRA update). The activation-hook ``branch`` applies the
same ``a b`` (materialised) to the input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.methods.lora import lora_factors_init
from jaxpeft.canonical_dot import matmul

_INITS = ("default", "gaussian", "random")


def output_scale(a: jax.Array, b: jax.Array, eta: float) -> jax.Array:
  """``c_j = 1 / sqrt(||(a b)_{:,j}||_2 + 1/eta^2)`` for every output unit ``j``, shape ``(d_out,)``."""
  col_norm_sq = jnp.sum(b * ((a.T @ a) @ b), axis=0)
  return jax.lax.rsqrt(jnp.sqrt(jnp.maximum(col_norm_sq, 0.0)) + 1.0 / eta**2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def allora_product(a: jax.Array, b: jax.Array, eta: float) -> jax.Array:
  """``a @ b`` whose gradient is rescaled per output column by ``output_scale`` (see the module docstring)."""
  return a @ b


def _product_fwd(a, b, eta):
  return a @ b, (a, b)


def _product_bwd(eta, residuals, grad):
  a, b = residuals
  grad = grad * output_scale(a, b, eta)
  return grad @ b.T, a.T @ grad


allora_product.defvjp(_product_fwd, _product_bwd)


@register_method("allora")
class ALLoRA(AdapterMethod):
  """``W' = W + a b`` (no scale, no dropout) with ALLoRA's gradient rescaling. See the module docstring."""

  inits = _INITS
  needs_matrix = True

  option_defaults = {"eta": None}

  def validate(self, target: Target) -> None:
    if target.dropout:
      raise ValueError(
          f"{target.path}: ALLoRA removes LoRA's dropout; set AdapterConfig.dropout=0 " f"(got {target.dropout})."
      )
    eta = target.option("eta")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
      raise ValueError(
          f"{target.path}: ALLoRA needs its gradient-scale constant eta > 0 (the factor at zero "
          f"update), got eta={eta!r}; set AdapterConfig.options={{'eta': 4.0}} (for example)."
      )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    return lora_factors_init(rng, kernel, target)

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return allora_product(leaves["a"], leaves["b"], float(target.option("eta")))

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return matmul(x, self.delta(leaves, target))
