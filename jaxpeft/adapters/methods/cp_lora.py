"""CP-LoRA: the kernel update as a rank-R CP (canonical polyadic) tensor over all kernel axes.

Paper: Minoccheri, Hodgman, Ma, Merchant, Wittrup, Williamson, Najarian, "LoRA-based methods on Unet for
transfer learning in Subarachnoid Hematoma Segmentation", 2025, arXiv:2508.01772 (also BMC Medical Imaging
26(1):58, doi:10.1186/s12880-025-02116-y; introduces CP-LoRA). CP format as in Kolda & Bader, "Tensor
Decompositions and Applications", SIAM Review 2009, and tensorly's ``CPTensor`` (weights + one factor matrix
per mode).

Sources [reconstructed]: the paper's body and its CP-LoRA code were not found (searched: arXiv HTML v1-v3 and
abstract pages, which hold only the abstract; code search for CP-LoRA / CP-DoRA / convDoRA / DoRA-C; the group's
public repositories). What was found: the abstract ("a novel CP-LoRA method based on tensor canonical polyadic
(CP) decomposition"), a review note reporting CP-LoRA at performance comparable to LoRA-C / convLoRA with
30-40% fewer trainable parameters, and the group's earlier code ``kayvanlabs/Transfer-Learning-SAH-Seg``
(``tune_cv.py``: tensorly ``parafac`` of each PyTorch conv weight ``(O, I, kh, kw)`` as one 4-way tensor, used
there to compress kernels, not as an adapter). We therefore take CP-LoRA as the rank-R 4-way CP tensor
(weights and one factor per kernel axis, as tensorly's CP) added to the kernel like LoRA's update; the init
and the scale are LoRA's conventions, not the paper's.

Math, for a Flax conv kernel ``K: (k_1, ..., k_n, I, O)`` (2-D: ``(kh, kw, I, O)``; PyTorch ``W_t: (O, I, kh,
kw)`` is ``K.permute(3, 2, 0, 1)``; a Dense kernel ``(I, O)`` is the case ``n = 0``)::

    Delta K = s * sum_{j=1..R} lam_j * u^(1)_j o ... o u^(n)_j o c_j o d_j        (o: outer product)
    K' = K + Delta K,   s = alpha / R,   R = config.rank

leaves ``spatial_<t>: (k_t, R)`` (one per spatial axis t), ``in: (I, R)``, ``out: (O, R)``, ``lam: (R,)``
(the CP weights [[lam; U^(1), ..., U^(n), C, D]]). In PyTorch order the same tensor is
``Delta W_t[o, i, h, w] = s * sum_j lam_j d[o, j] c[i, j] u1[h, j] u2[w, j]``.

Init [reconstructed]: ``lam = 1``, every factor but ``out`` drawn from
``U(-1/sqrt(n_t), 1/sqrt(n_t))`` with ``n_t`` the size of its own axis, ``out = 0`` (LoRA's zero ``B``), so
``K' = K`` at init and the first step already trains ``out``; ``init="random"`` also draws ``out`` (tests).
Param count: ``R (k_1 + ... + k_n + I + O + 1)`` (``R (2k + I + O + 1)`` for a k x k conv) -- against
``r k (I + O)`` for LoRA-C and ``r k^2 (I + O)`` for convLoRA.

Activation-hook (branch) form, for reference and tests: a CP conv is the sequence 1x1 conv ``I -> R`` (``c``),
a depthwise ``k_t``-tap conv along each spatial axis ``t`` (``u^(t)``, carrying that axis's stride, padding and
dilation), a per-channel scale ``s lam``, and a 1x1 conv ``R -> O`` (``d``) (Lebedev et al. 2015,
arXiv:1412.6553). jaxpeft applies the update by merging (``reparam.apply``), the core's hook mode only
intercepts Dense layers.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method

_INITS = ("default", "random")


def spatial_names(target: Target) -> list[str]:
  """Leaf names of the spatial factors, one per kernel axis before ``(I, O)``."""
  return [f"spatial_{t}" for t in range(len(target.layer_shape) - 2)]


def cp_init(rng: jax.Array, target: Target) -> Leaves:
  """CP factors and weights (see the module docstring)."""
  *spatial, c_in, c_out = target.layer_shape
  r = target.rank
  names = spatial_names(target) + ["in", "out"]
  keys = jax.random.split(rng, len(names))
  leaves = {}
  for key, name, size in zip(keys, names, spatial + [c_in, c_out]):
    bound = 1.0 / jnp.sqrt(size)
    if name == "out" and target.init != "random":
      leaves[name] = jnp.zeros((size, r), jnp.float32)
    else:
      leaves[name] = jax.random.uniform(key, (size, r), jnp.float32, -bound, bound)
  leaves["lam"] = jnp.ones((r,), jnp.float32)
  return leaves


def cp_kernel(leaves: Leaves, target: Target) -> jax.Array:
  """``Delta K`` in the per-layer kernel shape ``(k_1, ..., k_n, I, O)``."""
  factors = [leaves[name] for name in spatial_names(target)] + [leaves["in"], leaves["out"]]
  axes = string.ascii_lowercase[: len(factors)]
  spec = ",".join(f"{a}z" for a in axes) + ",z->" + axes
  return target.scaling * jnp.einsum(spec, *factors, leaves["lam"])


@register_method("cp_lora")
class CPLoRA(AdapterMethod):
  """``K' = K + s * [[lam; U^(1), ..., U^(n), C, D]]``. See the module docstring."""

  inits = _INITS
  layout = "conv"

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    return cp_init(rng, target)

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return cp_kernel(leaves, target).reshape(target.matrix_shape)
