"""Sparsifying a task vector before merging: keep the largest magnitudes (TIES' trim) or drop at random (DARE).

    magnitude_trim(τ, d):  keep the k = int(d · n) entries of largest |τ| (n = entries per layer), zero the rest
                           (``min_keep=1`` gives mergekit's k = max(1, int(d · n)) for d > 0)
    random_drop(τ, m):     τ ⊙ m with a keep-mask m ~ Bernoulli(d), rescaled so the update keeps its size:
                             "density" (DARE paper, PEFT):  τ ⊙ m / d   (drop rate p = 1 - d, 1/(1 - p))
                             "l1" (mergekit 0.1.5 ``rescale``): τ ⊙ m · ||τ||₁ / ||τ ⊙ m||₁
                             None: τ ⊙ m

References: Yadav et al., TIES-Merging, arXiv:2306.01708 (trim); Yu, Yu, Yu, Huang, Li, "Language Models
are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", ICML 2024, arXiv:2311.03099
(DARE). Transcribed from PEFT's ``peft.utils.merge_utils.magnitude_based_pruning`` / ``random_pruning``
and mergekit's ``mergekit.sparsify.magnitude`` / ``bernoulli``. Deviation: the trim keeps every entry whose
magnitude is at least the k-th largest (found by bisection, see ``_kth_largest_magnitude``) instead of
scattering k sorted indices, so entries tied in magnitude with the k-th are all kept (PEFT / mergekit break
such ties by sort order); with real-valued task vectors ties only occur at zero, where keeping or dropping
changes nothing. The bisection needs no sort and no materialised ``|τ|``: merging stays within a leaf's
memory and runs on sharded leaves without gathering them.
``batch_dims`` leading axes are ranked (trim) or L1-rescaled (drop) separately (scanned layers: per layer).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Rescale = Literal["density", "l1"] | None


def _kth_largest_magnitude(x: jax.Array, k: int, batch_dims: int) -> jax.Array:
  """The k-th largest ``|x|`` per leading index, by bisection on the float32 bit pattern (exact).

  Non-negative float32 values order like their int32 bit patterns, so 32 halvings of the bit range, each
  counting ``|x| >= mid`` in one fused pass over ``x``, find it exactly -- without sorting or materialising
  ``|x|``, and without gathering a sharded ``x`` (the count is an ordinary reduction).
  """
  axes = tuple(range(batch_dims, x.ndim))
  bits = jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32)
  batch = x.shape[:batch_dims] + (1,) * (x.ndim - batch_dims)

  def halve(_, bounds):
    lo, hi = bounds  # invariant: count(bits >= lo) >= k > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits >= mid, axis=axes, keepdims=True) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  start = (jnp.zeros(batch, jnp.int32), jnp.full(batch, 0x7F800001, jnp.int32))  # 0 and just above +inf
  lo, _ = jax.lax.fori_loop(0, 32, halve, start)
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def magnitude_threshold(x: jax.Array, density: float, *, batch_dims: int = 0, min_keep: int = 0) -> jax.Array:
  """The k-th largest ``|x|`` (per leading ``batch_dims`` index, broadcastable to ``x``); ``inf`` when k = 0."""
  n = math.prod(x.shape[batch_dims:])
  k = int(density * n)
  if density > 0:
    k = max(k, min_keep)
  shape = x.shape[:batch_dims] + (1,) * (x.ndim - batch_dims)
  if density >= 1.0:
    return jnp.zeros(shape, jnp.float32)
  if k == 0 or n == 0:
    return jnp.full(shape, jnp.inf, jnp.float32)
  return _kth_largest_magnitude(x, k, batch_dims)


def magnitude_trim(x: jax.Array, density: float, *, batch_dims: int = 0, min_keep: int = 0) -> jax.Array:
  """``x`` with all but its ``k`` largest-magnitude entries (per leading ``batch_dims`` index) set to 0."""
  if density >= 1.0:
    return x
  threshold = magnitude_threshold(x, density, batch_dims=batch_dims, min_keep=min_keep)
  return jnp.where(jnp.abs(x).astype(jnp.float32) >= threshold, x, jnp.zeros_like(x))


def bernoulli_mask(key: jax.Array, density: float, shape: tuple[int, ...]) -> jax.Array:
  """A keep-mask with ``P(1) = density``."""
  return jax.random.bernoulli(key, density, shape)


def random_drop(
    x: jax.Array, mask: jax.Array, density: float, rescale: Rescale = "density", *, batch_dims: int = 0
) -> jax.Array:
  """``x`` masked by ``mask`` (1 = keep) and rescaled; see the module docstring (L1 norms per ``batch_dims``)."""
  if density >= 1.0:
    return x
  masked = jnp.where(mask.astype(bool), x, jnp.zeros_like(x))
  if rescale is None:
    return masked
  if rescale == "density":
    return masked / density if density > 0 else masked
  if rescale == "l1":
    axes = tuple(range(batch_dims, x.ndim))
    before, after = jnp.abs(x).sum(axes, keepdims=True), jnp.abs(masked).sum(axes, keepdims=True)
    ok = (before >= 1e-7) & (after >= 1e-7)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)
  raise ValueError(f"rescale must be 'density', 'l1' or None, got {rescale!r}.")
