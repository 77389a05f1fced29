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
magnitude is at least the k-th largest (a threshold from ``lax.top_k``) instead of scattering k indices, so
entries tied in magnitude with the k-th are all kept (PEFT / mergekit break such ties by sort order);
with real-valued task vectors ties only occur at zero, where keeping or dropping changes nothing.
``batch_dims`` leading axes are ranked separately (scanned layers, one ranking per layer).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Rescale = Literal["density", "l1"] | None


def magnitude_trim(x: jax.Array, density: float, *, batch_dims: int = 0, min_keep: int = 0) -> jax.Array:
  """``x`` with all but its ``k`` largest-magnitude entries (per leading ``batch_dims`` index) set to 0."""
  if density >= 1.0:
    return x
  n = math.prod(x.shape[batch_dims:])
  k = int(density * n)
  if density > 0:
    k = max(k, min_keep)
  if k == 0 or n == 0:
    return jnp.zeros_like(x)
  magnitude = jnp.abs(x).reshape(x.shape[:batch_dims] + (n,))
  kth = jax.lax.top_k(magnitude, k)[0][..., -1:]
  keep = (magnitude >= kth).reshape(x.shape)
  return jnp.where(keep, x, jnp.zeros_like(x))


def bernoulli_mask(key: jax.Array, density: float, shape: tuple[int, ...]) -> jax.Array:
  """A keep-mask with ``P(1) = density``."""
  return jax.random.bernoulli(key, density, shape)


def random_drop(x: jax.Array, mask: jax.Array, density: float, rescale: Rescale = "density") -> jax.Array:
  """``x`` masked by ``mask`` (1 = keep) and rescaled; see the module docstring."""
  if density >= 1.0:
    return x
  masked = jnp.where(mask.astype(bool), x, jnp.zeros_like(x))
  if rescale is None:
    return masked
  if rescale == "density":
    return masked / density if density > 0 else masked
  if rescale == "l1":
    before, after = jnp.abs(x).sum(), jnp.abs(masked).sum()
    ok = (before >= 1e-7) & (after >= 1e-7)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)
  raise ValueError(f"rescale must be 'density', 'l1' or None, got {rescale!r}.")
