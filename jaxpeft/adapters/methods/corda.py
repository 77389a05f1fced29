"""CorDA: context-oriented LoRA init from the SVD of ``W C``, ``C`` = covariance of the layer's inputs.

Paper: Yang, Li, Zhou, Song, Wu, Nie, Ghanem, "CorDA: Context-Oriented Decomposition Adaptation of Large
Language Models for Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv:2406.05223.
Reference implementation followed: Hugging Face PEFT ``peft/tuners/lora/corda.py`` (``preprocess_corda``,
``calib_cov_distribution``, ``collect_eigens_for_layer``, ``crop_corda_eigens``) and ``LoraLayer.corda_init``,
itself ported from the authors' iboing/CorDA ``cordalib/decomposition.py``.

Covariance (PEFT ``calib_cov_distribution``): for each calibration call of a target layer with inputs
``X: (tokens, d_in)``, ``X̂ = X / |max(X)|`` (the largest *signed* entry, as PEFT), and
``C = mean over calls of X̂ᵀ X̂``. ``collect_covariances`` computes it for linen Dense / DenseGeneral targets.

Decomposition (PEFT ``collect_eigens_for_layer``), PyTorch orientation ``W: (d_out, d_in)``: damp
``C_λ = C + λ mean(diag C) I`` with ``λ = 0.01`` doubled until ``‖C_λ C_λ⁻¹ - I‖_F < 0.05``; SVD
``W C_λ = U Σ Vᵀ``, so ``W = U Σ (Vᵀ C_λ⁻¹)``. Mode (option ``mode``):
  * ``"ipm"`` (instruction-previewed; calibration data from the fine-tuning task): the adapter takes the
    **top**-``r`` components;
  * ``"kpm"`` (knowledge-preserved; calibration data from knowledge to keep, e.g. QA): the **bottom**-``r``.
Adapter (PEFT ``corda_init``): ``B = U_r sqrt(Σ_r/s)``, ``A = sqrt(Σ_r/s) (Vᵀ C_λ⁻¹)_r``, and the base becomes
the residual ``W - s B A``. In the Flax layout (kernel ``K = Wᵀ``, ``C K = (W C)ᵀ``) the leaves are
``a = Aᵀ: (d_in, r)`` and ``b = Bᵀ: (r, d_out)``; after init the adapter is plain LoRA::

    K' = K_res + s a b,       K_res = K - s a₀ b₀,       s = alpha / r (or alpha / sqrt(r), rsLoRA)

Trainable parameters per matrix: ``r (d_in + d_out)``; no frozen leaves. Merge / unmerge: as LoRA. To turn
a trained adapter into an ordinary LoRA on the *original* base, ``s (a b - a₀ b₀)`` is the rank-``2r`` LoRA
``[a, -a₀] [b; b₀]`` (PEFT ``path_initial_model_for_weight_conversion``).

Usage::

    covs = corda.collect_covariances(lambda p, x: model.apply({"params": p}, x), params, batches, config)
    residual_base, adapter = corda.init_with_base(config, params, covs)   # train `adapter` on `residual_base`

The training harness does this before a fresh run (``config.adapter.method='corda'``; covariances from
``config.adapter.calibration_batches`` training batches, model in eval mode; see ``jaxpeft.train.trainable``),
freezes the residual base and exports ``K_res + s a b``. The adapter alone is relative to ``K_res``: applied to
the original base it needs the rank-``2r`` form above.

``reparam.init_with_base`` with ``method="corda"`` (no covariances) uses ``C = I``: plain SVD of ``W``, i.e.
PiSSA for ``ipm`` and MiLoRA-style minor components for ``kpm``. It exists so that checkpoints can be
validated against a model (``checkpoint.load_adapter(path, base_params)``); use ``init_with_base`` of this
module for CorDA proper. Covariances are float32 (PEFT's ``use_float16_for_covariance`` is not offered);
stacked (scanned) targets are not supported by ``collect_covariances`` / ``init_with_base``.
Implementation note: ``AdapterMethod.init`` receives only ``(rng, kernel, target)``, so ``init_with_base``
hands the covariances to it through a context variable set for the duration of that one call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.adapters import interception, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.methods.lora import LoRA
from jaxpeft.adapters.selection import select_targets

_MODES = ("ipm", "kpm")
_COVARIANCES: contextvars.ContextVar[Mapping[str, jax.Array] | None] = contextvars.ContextVar(
    "jaxpeft_corda_covariances", default=None
)


def damped_inverse(covariance: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(C_λ, C_λ⁻¹)`` with PEFT's damping schedule (``λ = 0.01, 0.02, 0.04, ...`` until the inverse is good)."""
  eye = jnp.eye(covariance.shape[0], dtype=jnp.float32)
  unit = jnp.mean(jnp.diag(covariance)) * eye

  def attempt(damp):
    damped = covariance + damp * unit
    inverse = jnp.linalg.inv(damped)
    return damped, inverse, jnp.linalg.norm(damped @ inverse - eye)

  damp = jax.lax.while_loop(lambda d: attempt(d)[2] >= 0.05, lambda d: 2.0 * d, jnp.float32(0.01))
  damped, inverse, _ = attempt(damp)
  return damped, inverse


def corda_factors(kernel: jax.Array, covariance: jax.Array, target: Target) -> Leaves:
  """``{"a": (d_in, r), "b": (r, d_out)}`` from the SVD of ``C_λ K`` (see the module docstring)."""
  damped, inverse = damped_inverse(covariance)
  # C K = (W C)ᵀ = V Σ Uᵀ: its left singular vectors are PEFT's V, its right ones PEFT's U.
  left, sigma, right_t = jnp.linalg.svd(damped @ kernel, full_matrices=False)
  r = target.rank
  keep = slice(None, r) if target.option("mode") == "ipm" else slice(-r, None)
  root = jnp.sqrt(sigma[keep] / target.scaling)
  return {"a": (inverse @ left[:, keep]) * root, "b": root[:, None] * right_t[keep]}


@register_method("corda")
class CorDA(LoRA):
  """LoRA whose init is the CorDA decomposition; the base becomes the residual. See the module docstring."""

  peft = None  # PEFT stores CorDA adapters as LoRA on a residual base; not exported as such here

  inits = ("default",)
  needs_matrix = True
  bounded_rank = True

  option_defaults = {"mode": "ipm"}

  def validate(self, target: Target) -> None:
    if target.option("mode") not in _MODES:
      raise ValueError(
          f"{target.path}: CorDA option mode must be one of {_MODES}, " f"got {target.option('mode')!r}."
      )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    covariances = _COVARIANCES.get()
    if covariances is None:
      covariance = jnp.eye(kernel.shape[0], dtype=jnp.float32)
    else:
      covariance = jnp.asarray(covariances[target.path], jnp.float32)
    return corda_factors(kernel, covariance, target)

  def modifies_base(self, target: Target) -> bool:
    return True

  def calibrate(
      self, apply_fn: Callable[[Any, Any], Any], base_params: Any, batches: Iterable[Any], config: AdapterConfig
  ) -> dict[str, jax.Array]:
    return collect_covariances(apply_fn, base_params, batches, config)

  def calibrated_init(
      self, config: AdapterConfig, base_params: Any, calibration: Mapping[str, jax.Array]
  ) -> tuple[Any, reparam.AdapterParams]:
    return init_with_base(config, base_params, calibration)


def _check_covariances(config: AdapterConfig, base_params: Any, covariances: Mapping[str, jax.Array]) -> None:
  targets = select_targets(config, base_params)
  expected = {t.path for t in targets}
  missing, unexpected = sorted(expected - set(covariances)), sorted(set(covariances) - expected)
  if missing or unexpected:
    raise ValueError(
        f"covariances must have one entry per CorDA target.\n  missing: {missing}\n"
        f"  unexpected: {unexpected}\nBuild them with corda.collect_covariances(..., config)."
    )
  for t in targets:
    if t.stacked_axes:
      raise ValueError(f"{t.path}: CorDA does not support stacked (scanned) targets.")
    d_in = t.matrix_shape[0]
    if tuple(jnp.shape(covariances[t.path])) != (d_in, d_in):
      raise ValueError(
          f"{t.path}: covariance must have shape ({d_in}, {d_in}) (folded d_in), got "
          f"{tuple(jnp.shape(covariances[t.path]))}."
      )


@contextlib.contextmanager
def _using(covariances: Mapping[str, jax.Array]) -> Iterator[None]:
  token = _COVARIANCES.set(covariances)
  try:
    yield
  finally:
    _COVARIANCES.reset(token)


def init_with_base(
    config: AdapterConfig, base_params: Any, covariances: Mapping[str, jax.Array]
) -> tuple[Any, reparam.AdapterParams]:
  """``(residual_base, adapter_params)`` of CorDA for ``config`` (``method="corda"``).

  Args:
    config: an ``AdapterConfig`` with ``method="corda"`` and ``options={"mode": "ipm" | "kpm"}``.
    base_params: the pretrained parameters.
    covariances: ``{target path: (d_in, d_in) input covariance}``, e.g. from ``collect_covariances``.
  """
  if config.method != "corda":
    raise ValueError(f"corda.init_with_base needs AdapterConfig(method='corda'), got {config.method!r}.")
  _check_covariances(config, base_params, covariances)
  with _using(covariances):
    # The CorDA init is deterministic: the key is unused.
    return reparam.init_with_base(jax.random.key(0), config, base_params)


def collect_covariances(
    apply_fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any], config: AdapterConfig
) -> dict[str, jax.Array]:
  """PEFT's calibration covariances of the inputs of every target of ``config``.

  Args:
    apply_fn: ``apply_fn(params, batch)`` runs the linen model, e.g.
      ``lambda p, x: model.apply({"params": p}, x)``. Targets must be called through ``nn.Dense`` /
      ``nn.DenseGeneral`` (contracting the trailing input axes) inside it.
    params: the linen ``variables['params']`` tree.
    batches: calibration batches; each call of a target counts as one sample (as PEFT's hook).
    config: the adapter config whose targets need covariances.

  Returns:
    ``{target path: C}`` with ``C = mean over calls of X̂ᵀ X̂``, ``X̂ = X / |max(X)|``, ``X`` the call's input
    folded to ``(tokens, d_in)``.
  """
  targets = select_targets(config, params)

  def batch_moments(params, batch):
    moments: dict[str, list[jax.Array]] = {}

    def handler(next_fun, args, kwargs, module, target):
      if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
        raise ValueError(
            f"{target.path}: collect_covariances needs Dense / DenseGeneral targets, got "
            f"{type(module).__name__}."
        )
      x = args[0] if args else kwargs["inputs"]
      x = x.reshape(-1, target.matrix_shape[0]).astype(jnp.float32)
      x = x / jnp.abs(jnp.max(x))
      moments.setdefault(target.path, []).append(x.T @ x)
      return next_fun(*args, **kwargs)

    with interception.intercept(
        {interception.module_path(t): t for t in targets}, handler, "calibration capture (collect_covariances)"
    ):
      apply_fn(params, batch)
    return {p: jnp.stack(m) for p, m in moments.items()}

  step = jax.jit(batch_moments)
  sums: dict[str, jax.Array] = {}
  counts: dict[str, int] = {}
  for batch in batches:
    for path, stacked_moments in step(params, batch).items():
      sums[path] = sums.get(path, 0.0) + jnp.sum(stacked_moments, axis=0)
      counts[path] = counts.get(path, 0) + stacked_moments.shape[0]
  if not counts:
    raise ValueError("collect_covariances got no calibration batches; pass at least one.")
  return {t.path: sums[t.path] / counts[t.path] for t in targets}
