"""VeRA: vector-based random matrix adaptation (frozen random projections, trained scaling vectors).

Paper: Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
arXiv:2310.11454. Reference implementation followed: Hugging Face PEFT ``peft/tuners/vera``
(``VeraModel._init_vera_A_vera_B``, ``_kaiming_init``, ``VeraLayer.update_layer / reset_vera_parameters``,
``Linear.get_delta_weight / forward``).

Math, on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W + bias``)::

    W' = W + (proj_a * d) @ (proj_b * b)        i.e.  Delta = A diag(d) B diag(b)
    proj_a: (d_in, r)   frozen, = PEFT ``vera_A[:, :d_in].T``
    proj_b: (r, d_out)  frozen, = PEFT ``vera_B[:d_out, :].T``
    d: (r,)  b: (d_out,)  trained (PEFT ``vera_lambda_d``, ``vera_lambda_b``)

There is no ``alpha / r`` scaling (as in the paper and PEFT); ``config.alpha`` is unused.
Activation-hook mode: ``y = x W + bias + ((x proj_a) * d) proj_b * b``.

Inits (``config.init``):
  * ``"default"`` (PEFT ``init_weights=True``): ``b = 0`` (so ``W' = W``), ``d = d_initial`` (option, 0.1).
  * ``"random"`` (PEFT ``init_weights=False``, for tests): ``b = 1``, ``d ~ N(0, 1)``.
  * Projections: PEFT's ``_kaiming_init`` (gain sqrt(2), torch fan-in = the tensor's second axis):
    ``vera_A (r, D_in) ~ U(+-sqrt(6 / D_in))`` and ``vera_B (D_out, r) ~ U(+-sqrt(6 / r))``, where
    ``(D_in, D_out)`` is the size of the shared matrices (below). Note the bound is ``sqrt(6/fan_in)``
    here, not LoRA's ``1/sqrt(fan_in)``.

Shared projections. PEFT keeps *one* pair ``vera_A (r, max d_in)``, ``vera_B (max d_out, r)`` for all adapted
layers (a buffer drawn from ``projection_prng_key``) and each layer uses its top-left slice. Here every
target stores its own slice as ``frozen_leaves`` (``proj_a``, ``proj_b``), drawn from the *same* key
``jax.random.key(projection_seed)`` (option, default 0) -- not from the per-target key -- with the shared
shape ``projection_shape = (D_in, D_out)`` (option) and then sliced, so all targets see slices of the same
two matrices, exactly PEFT's semantics. ``projection_shape=None`` (default) uses the target's own
``(d_in, d_out)``: identical projections for all targets of equal shape (the common case); for targets
of different shapes pass the elementwise maximum (PEFT's ``_find_dim``) to get PEFT's sharing and bounds.
Difference from PEFT: the slices are stored per target (memory and checkpoint size ``r (d_in + d_out)``
per target instead of once; PEFT's ``save_projection=True``, its default, also checkpoints them), and
the draws are JAX's, not ``torch.Generator``'s, so a PEFT checkpoint saved without projections cannot be
reproduced bit-exactly (load PEFT's ``vera_A/vera_B`` into ``proj_a/proj_b`` instead, transposed).
Stacked (scanned) layers share the projections too, as in PEFT.

Trainable parameters per adapted matrix: ``d_out + r`` (frozen, stored: ``r (d_in + d_out)``).
Merge: yes (additive); unmerge: exact up to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.peft_mapping import Layout, PeftMapping, Rule, same, transpose
from jaxpeft.canonical_dot import matmul

_INITS = ("default", "random")


def _projection_shape(target: Target) -> tuple[int, int]:
  shape = target.option("projection_shape")
  return target.matrix_shape if shape is None else (int(shape[0]), int(shape[1]))


def shared_projections(target: Target) -> tuple[jax.Array, jax.Array]:
  """The target's slices ``(proj_a (d_in, r), proj_b (r, d_out))`` of the shared projections."""
  d_in, d_out = target.matrix_shape
  max_in, max_out = _projection_shape(target)
  r = target.rank
  key_a, key_b = jax.random.split(jax.random.key(target.option("projection_seed")))
  bound_a, bound_b = (6.0 / max_in) ** 0.5, (6.0 / r) ** 0.5
  proj_a = jax.random.uniform(key_a, (max_in, r), jnp.float32, -bound_a, bound_a)
  proj_b = jax.random.uniform(key_b, (r, max_out), jnp.float32, -bound_b, bound_b)
  return proj_a[:d_in], proj_b[:, :d_out]


def single_rank(method: str, targets: Sequence[Target], alphas: set[float]) -> None:
  """PEFT's VeRA / RandLoRA have one rank (and alpha) for all layers."""
  if len({t.rank for t in targets}) > 1 or len(alphas) > 1:
    raise ValueError(
        f"PEFT's {method!r} has one rank (and alpha) for all layers; this adapter uses "
        "per-target ranks or alphas (rank_pattern / alpha_pattern). Use a single rank."
    )


def with_projection_shape(options: dict[str, Any], targets: Sequence[Target]) -> dict[str, Any]:
  """The shared projections' shape on import: the largest folded in/out dimensions of the targets."""
  shape = (max(t.matrix_shape[0] for t in targets), max(t.matrix_shape[1] for t in targets))
  return {**options, "projection_shape": shape}


# PEFT VeraConfig: d -> vera_lambda_d, b -> vera_lambda_b; shared: proj_a.T, proj_b.T are the top-left slices
# of base_model.vera_A (r, max in) and base_model.vera_B (max out, r).
def _vera_rules(layout: Layout, target: Target | None) -> dict[str, Rule]:
  return {
      "proj_a": Rule("vera_A", transpose, shared=True),
      "proj_b": Rule("vera_B", transpose, shared=True),
      "d": Rule("vera_lambda_d", same),
      "b": Rule("vera_lambda_b", same),
  }


def _vera_config_fields(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict:
  single_rank("vera", targets, set())
  return {
      "r": targets[0].rank,
      "save_projection": True,
      "init_weights": True,
      "projection_prng_key": 0,
      "d_initial": dict(targets[0].options)["d_initial"],
      "vera_dropout": config.dropout,
  }


def _vera_shared_shapes(targets: Sequence[Target]) -> dict[str, tuple[int, ...]]:
  r = targets[0].rank
  max_in, max_out = max(t.matrix_shape[0] for t in targets), max(t.matrix_shape[1] for t in targets)
  return {"vera_A": (r, max_in), "vera_B": (max_out, r)}


_PEFT = PeftMapping(
    "VERA",
    ("linear",),
    _vera_rules,
    _vera_config_fields,
    lambda peft_config, *_: {"d_initial": peft_config.get("d_initial", 0.1)},
    dropout_field="vera_dropout",
    shared_shapes=_vera_shared_shapes,
    complete_options=with_projection_shape,
)


@register_method("vera")
class VeRA(AdapterMethod):
  """``W' = W + (proj_a * d) @ (proj_b * b)`` with frozen shared projections. See the module docstring."""

  peft = _PEFT

  option_defaults = {"d_initial": 0.1, "projection_seed": 0, "projection_shape": None}
  frozen_leaves = frozenset({"proj_a", "proj_b"})
  inits = _INITS
  needs_matrix = True

  def validate(self, target: Target) -> None:
    max_in, max_out = _projection_shape(target)
    d_in, d_out = target.matrix_shape
    if max_in < d_in or max_out < d_out:
      raise ValueError(
          f"{target.path}: options projection_shape={(max_in, max_out)} is smaller than this "
          f"target's folded shape {(d_in, d_out)}; use the elementwise maximum over all targets."
      )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    proj_a, proj_b = shared_projections(target)
    d_out, r = target.matrix_shape[1], target.rank
    if target.init == "random":
      d = jax.random.normal(rng, (r,), jnp.float32)
      b = jnp.ones((d_out,), jnp.float32)
    else:
      d = jnp.full((r,), target.option("d_initial"), jnp.float32)
      b = jnp.zeros((d_out,), jnp.float32)
    return {"proj_a": proj_a, "proj_b": proj_b, "d": d, "b": b}

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return (leaves["proj_a"] * leaves["d"]) @ (leaves["proj_b"] * leaves["b"])

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return matmul(matmul(x, leaves["proj_a"]) * leaves["d"], leaves["proj_b"]) * leaves["b"]
