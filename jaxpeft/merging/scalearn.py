"""ScaLearn: combine the output representations of K frozen source adapters with learned scales.

    h^l = Σ_k ω_k^l ⊙ h_k^l (+ r^l)        h_k^l: source adapter k's output at layer l, r^l: the residual
    ω_k^l ∈ R^d ("vector")  or  ω_k^l ∈ R ("scalar", broadcast over the d features)
    ω*    = argmin_ω  E_batch loss(model with h^l, batch)       only ω is trained (any optax optimizer)

Variants (the paper's names): ScaLearn = vector scales per layer; ScaLearnUniform = one scalar per source
per layer; ScaLearn++ / ScaLearnUniform++ = the same scales shared by every layer (``VARIANTS``). Scales
start at ``init_scale / K`` ("avg", the reference default) or ``init_scale`` ("value"), plus N(0, 10⁻³)
noise. ``normalize="mean"`` / ``"softmax"`` are the reference's ``take_mean`` / ``take_softmax`` ablations
(ω_k / Σ_j ω_j, softmax over k).

Frohmann, Holtermann, Masoudian, Lauscher, Rekabsaz, "ScaLearn: Simple and Highly Parameter-Efficient Task
Transfer by Learning to Scale", Findings of ACL 2024, arXiv:2310.01217; reference code CPJKU/ScaLearn
(``ScaLearn`` / ``ScaLearnPlusPlus`` modules and ``init_shared_parameters_scalearn`` in its
adapter-transformers fork). These are pure functions: the caller's model calls ``combine`` where the
reference's adapter layer sums ``omega * up_list`` and picks its layer's scales with ``layer_scales``.
Deviations: no dropout on the scales (the reference's ``dropout_ratio``, 0 in its scripts); the training
loop is a plain jitted optax loop (``fit``) instead of the Hugging Face Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxpeft.merging.coefficients import fit_coefficients
from jaxpeft.merging.trees import PyTree

Normalize = Literal["none", "mean", "softmax"]
# variant -> (scale shape, one set of scales per layer)
VARIANTS = {
    "scalearn": ("vector", True),
    "scalearn_uniform": ("scalar", True),
    "scalearn++": ("vector", False),
    "scalearn_uniform++": ("scalar", False),
}
SHARED = "shared"  # the key of the single set of scales of the "++" variants


def init_scales(
    key: jax.Array,
    num_sources: int,
    dim: int,
    layers: Sequence[str],
    variant: str = "scalearn",
    *,
    init: Literal["avg", "value"] = "avg",
    init_scale: float = 1.0,
    std: float = 1e-3,
) -> dict[str, jax.Array]:
  """``{layer: ω}`` (or ``{"shared": ω}`` for "++" variants), ω of shape ``(K, d)`` or ``(K, 1)``."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ScaLearn variant {variant!r}; expected one of {sorted(VARIANTS)}.")
  if init not in ("avg", "value"):
    raise ValueError(f"init must be 'avg' (init_scale / num_sources) or 'value' (init_scale), got {init!r}.")
  shape, per_layer = VARIANTS[variant]
  names = list(layers) if per_layer else [SHARED]
  mean = init_scale / num_sources if init == "avg" else init_scale
  size = (num_sources, dim if shape == "vector" else 1)
  keys = jax.random.split(key, len(names))
  return {name: mean + std * jax.random.normal(k, size, jnp.float32) for name, k in zip(names, keys)}


def layer_scales(scales: dict[str, jax.Array], layer: str) -> jax.Array:
  """The scales ``layer`` uses: its own, or the shared ones of a "++" variant."""
  if SHARED in scales:
    return scales[SHARED]
  if layer not in scales:
    raise KeyError(f"No ScaLearn scales for layer {layer!r}; the scales cover {sorted(scales)}.")
  return scales[layer]


def combine(
    representations: Sequence[jax.Array] | jax.Array,
    scales: jax.Array,
    residual: jax.Array | None = None,
    normalize: Normalize = "none",
) -> jax.Array:
  """``Σ_k ω_k ⊙ h_k (+ residual)`` for ``K`` representations of shape ``(..., d)`` and ``scales`` (K, d|1)."""
  h = jnp.stack(list(representations)) if not isinstance(representations, jax.Array) else representations
  if scales.ndim != 2 or scales.shape[0] != h.shape[0] or scales.shape[1] not in (1, h.shape[-1]):
    raise ValueError(
        f"scales must have shape (num_sources, d) or (num_sources, 1) = ({h.shape[0]}, {h.shape[-1]} or 1) "
        f"for {h.shape[0]} representations of shape {tuple(h.shape[1:])}, got {tuple(scales.shape)}."
    )
  if normalize == "mean":
    scales = scales / jnp.sum(scales, axis=0, keepdims=True)
  elif normalize == "softmax":
    scales = jax.nn.softmax(scales, axis=0)
  elif normalize != "none":
    raise ValueError(f"normalize must be 'none', 'mean' or 'softmax', got {normalize!r}.")
  w = scales.reshape((scales.shape[0],) + (1,) * (h.ndim - 2) + (scales.shape[1],))
  out = jnp.sum(w * h, axis=0)
  return out if residual is None else out + residual


def fit(
    scales: PyTree,
    loss_fn: Callable[[PyTree, Any], jax.Array],
    batches: Iterable[Any],
    optimizer: optax.GradientTransformation,
) -> PyTree:
  """The scales after one ``optimizer`` step on ``loss_fn(scales, batch)`` per (few-shot) batch."""
  return fit_coefficients(scales, lambda s, _, batch: loss_fn(s, batch), batches, optimizer)
