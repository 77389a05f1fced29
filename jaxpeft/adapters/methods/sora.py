"""SoRA: sparse low-rank adaptation -- a LoRA whose rank components are gated, the gate trained with an L1 prox.

Paper: Ding, Lv, Wang, Chen, Zhou, Liu, Sun, "Sparse Low-rank Adaptation of Pre-trained Language Models",
EMNLP 2023, arXiv:2311.11696. Reference implementation followed: TsinghuaC3I/SoRA (``src/lora.py``
``LowRankLinear``; ``src/sparse_optimizer.py`` and ``src/sparse_optimizer_multiply_lr.py`` ``SparseAdamW``).

Parameterisation (method ``"sora"``), on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W``)::

    W' = W + s * (a * g) @ b,     a: (d_in, r),  g: (r,),  b: (r, d_out),  s = alpha / r

i.e. ``Delta W = s * a diag(g) b`` (PyTorch layout ``B diag(g) A``). Activation-hook mode:
``y = x W + s * ((drop(x) a) * g) b``. Init as the reference: ``a`` PyTorch ``kaiming_uniform_(a=sqrt(5))``
(``U(-1/sqrt(d_in), 1/sqrt(d_in))``), ``b = 0``, ``g ~ N(0, 1)``; the reference defaults are ``r = 8``,
``alpha = 16``. ``config.init`` "gaussian" / "random" change ``a`` / ``b`` as in ``jaxpeft.adapters.methods.lora``.
Trainable parameters per matrix: ``r (d_in + d_out) + r``; after pruning the zero gates,
``nnz(g) (d_in + d_out)``. Mergeable (the update is linear in the leaves).

Proximal step on the gate (``proximal_l1``): after the base optimizer's update ``u``::

    g <- sign(g + u) * max(|g + u| - xi, 0)          (soft-thresholding)

with ``xi = sparse_lambda`` (reference ``sparse_optimizer.py``: the threshold is *not* multiplied by the
learning rate) or ``xi = sparse_lambda * learning_rate`` (``sparse_optimizer_multiply_lr.py``, the
paper's ``eta_t * lambda`` form) when ``learning_rate`` is given. Both may be schedules; a schedule on
``sparse_lambda`` is the paper's sparsifying scheduler (the reference's ``linear`` / ``log_linear`` /
``exp_linear`` lambda lists are ``optax`` schedules of the step count). It composes after any optimizer::

    tx = optax.chain(optax.adamw(1e-3, weight_decay=0.0), optax.masked(proximal_l1(1e-3), gate_mask))

or, as the reference does (AdamW with weight decay for ``a``/``b``, a separate Adam + prox for ``g``)::

    tx = optax.multi_transform({"factor": optax.adamw(1e-3, weight_decay=0.1),
                                "gate": optax.chain(optax.adam(1e-3), proximal_l1(1e-3))},
                               sora_labels(adapter_params))

After training, ``prune_to_lora`` turns the adapter into a plain LoRA of per-target rank ``nnz(g)``.

Deviation from the reference: the reference applies the threshold with three *sequential* in-place
masked edits (``g[g > xi] -= xi``, ``g[g < -xi] += xi``, ``g[|g| < xi] = 0``). The third sees the values
already shrunk by the first two, so every ``|g| < 2 xi`` ends at 0 (``xi < |g| < 2 xi`` too) and the map
jumps from 0 to ``xi`` at ``|g| = 2 xi``; this is not the soft-threshold (proximal operator) the paper
writes. We follow the paper; ``proximal_l1(..., reference_zeroing=True)`` reproduces the reference.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.methods.lora import lora_factors_init
from jaxpeft.canonical_dot import matmul

_INITS = ("default", "gaussian", "random")
GATE = "gate"


@register_method("sora")
class SoRA(AdapterMethod):
  """``W' = W + s (a * g) b`` with an L1-proximal gate ``g``. See the module docstring."""

  inits = _INITS
  needs_matrix = True
  no_decay_leaves = frozenset({GATE})

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    key_factors, key_gate = jax.random.split(rng)
    leaves = lora_factors_init(key_factors, kernel, target)
    leaves[GATE] = jax.random.normal(key_gate, (target.rank,), jnp.float32)
    return leaves

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return target.scaling * ((leaves["a"] * leaves[GATE]) @ leaves["b"])

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return matmul(matmul(x, leaves["a"]) * (target.scaling * leaves[GATE]), leaves["b"])

  def loss_term(self, config: AdapterConfig, *, sparse_lambda: float):
    """``sparse_lambda * sum |g| / n_gates`` over all gates (``penalty.sparse_lambda``; reference trainer)."""
    if isinstance(sparse_lambda, bool) or not isinstance(sparse_lambda, (int, float)) or sparse_lambda < 0:
      raise ValueError(
          f"SoRA's penalty sparse_lambda={sparse_lambda!r} must be a number >= 0 (the "
          "reference uses the proximal step's sparse_lambda)."
      )
    return lambda base_params, adapter_params, rng: sparse_lambda * gate_l1(adapter_params)

  def update_rule(
      self,
      config: AdapterConfig,
      *,
      sparse_lambda: optax.ScalarOrSchedule,
      learning_rate: optax.ScalarOrSchedule | None = None,
      reference_zeroing: bool = False,
  ) -> optax.GradientTransformation:
    """``proximal_l1`` on the gates only, from ``config.adapter.update`` (e.g. ``update.sparse_lambda``)."""
    return optax.masked(proximal_l1(sparse_lambda, learning_rate, reference_zeroing=reference_zeroing), gate_mask)


def soft_threshold(x: jax.Array, threshold: jax.Array) -> jax.Array:
  """``sign(x) * max(|x| - threshold, 0)``: the proximal operator of ``threshold * ||x||_1``."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0.0)


class ProximalL1State(NamedTuple):
  count: jax.Array


def reference_threshold(x: jax.Array, threshold: jax.Array) -> jax.Array:
  """The reference's sequential masked edits: 0 where ``|x| < 2 threshold``, else ``x - sign(x) threshold``."""
  return jnp.where(jnp.abs(x) < 2 * threshold, 0.0, x - jnp.sign(x) * threshold)


def proximal_l1(
    sparse_lambda: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference_zeroing: bool = False,
) -> optax.GradientTransformation:
  """Turns the incoming update ``u`` into ``prox(params + u) - params`` (soft-threshold, see module docstring).

  Args:
    sparse_lambda: the threshold ``xi`` (reference ``sparse_lambda_2``), a float or a schedule of the step.
    learning_rate: if given (float or schedule), the threshold is ``sparse_lambda * learning_rate``.
    reference_zeroing: use TsinghuaC3I/SoRA's thresholding (``reference_threshold``) instead of the
      soft-threshold (see the module docstring).

  Must come last in the chain (after the learning rate is applied). Acts on every leaf it receives: use
  ``optax.masked(proximal_l1(...), gate_mask)`` or ``sora_labels`` to limit it to the gates.
  """

  def init_fn(params):
    del params
    return ProximalL1State(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("proximal_l1 needs the current params: call tx.update(grads, state, params).")
    threshold = sparse_lambda(state.count) if callable(sparse_lambda) else sparse_lambda
    if learning_rate is not None:
      threshold = threshold * (learning_rate(state.count) if callable(learning_rate) else learning_rate)
    prox = reference_threshold if reference_zeroing else soft_threshold
    new_updates = jax.tree.map(lambda u, p: (prox(p + u, threshold) - p).astype(u.dtype), updates, params)
    return new_updates, ProximalL1State(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def gate_l1(adapter_params: Any) -> jax.Array:
  """``sum |g| / n_gates`` over every gate of the adapter (stacked layers included)."""
  gates = [g for path, g in traverse_util.flatten_dict(adapter_params).items() if path[-1] == GATE]
  if not gates:
    raise ValueError("gate_l1 expects SoRA adapter params (leaves named 'gate'); found none.")
  return sum(jnp.sum(jnp.abs(g)) for g in gates) / sum(g.size for g in gates)


def gate_mask(adapter_params: Any) -> Any:
  """A bool tree like ``adapter_params``: True at SoRA gate leaves (for ``optax.masked``)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == GATE, adapter_params)


def sora_labels(adapter_params: Any) -> Any:
  """``"gate"`` at gate leaves, ``"factor"`` elsewhere (for ``optax.multi_transform``)."""
  return jax.tree.map(lambda is_gate: "gate" if is_gate else "factor", gate_mask(adapter_params))


def prune_to_lora(adapter_params: Any, config: AdapterConfig) -> tuple[Any, AdapterConfig]:
  """``(lora_adapter, lora_config)``: keep the ranks with a non-zero gate, folding the gate into ``b``.

  ``a' = a[:, S]``, ``b' = g[S, None] * b[S]`` with ``S = {i : g_i != 0}``, rank ``|S|`` per target (via
  ``rank_pattern``) and the same ``alpha / r`` scale (``alpha`` is rescaled per target so that
  ``alpha' / |S| = alpha / r``). The result is a ``"lora"`` adapter with identical ``apply`` / ``merge``.
  Runs eagerly (the ranks are data-dependent). Targets whose gates are all zero must be dropped from
  ``config.targets`` first (LoRA needs rank >= 1); this raises naming them. Stacked targets keep the
  union of their layers' non-zero ranks.
  """
  if config.method != "sora":
    raise ValueError(f"prune_to_lora expects a 'sora' adapter, got method {config.method!r}.")
  if config.use_rslora:
    raise ValueError("prune_to_lora does not support use_rslora=True (the scale would change with the rank).")
  flat = traverse_util.flatten_dict(adapter_params, sep="/")
  paths = sorted({k.rpartition("/")[0] for k in flat})
  pruned, ranks, alphas, empty = {}, {}, {}, []
  for path in paths:
    a, b, g = (np.asarray(flat[f"{path}/{name}"]) for name in ("a", "b", GATE))
    keep = np.flatnonzero(np.any(g.reshape(-1, g.shape[-1]) != 0, axis=0))
    if keep.size == 0:
      empty.append(path)
      continue
    pruned[f"{path}/a"] = jnp.asarray(a[..., keep])
    pruned[f"{path}/b"] = jnp.asarray(g[..., keep, None] * b[..., keep, :])
    rank = config.pattern_value("rank_pattern", path, config.rank)
    ranks[re.escape(path)] = int(keep.size)
    alphas[re.escape(path)] = config.pattern_value("alpha_pattern", path, config.alpha) * keep.size / rank
  if empty:
    raise ValueError(
        f"All gates are zero for {empty}: these targets no longer adapt anything; exclude them "
        "from AdapterConfig.targets (and their leaves from the adapter) before pruning."
    )
  lora_config = AdapterConfig(
      targets=config.targets,
      method="lora",
      rank=config.rank,
      alpha=config.alpha,
      dropout=config.dropout,
      init="default",
      rank_pattern=ranks,
      alpha_pattern=alphas,
      fan_in_axes=config.fan_in_axes,
      stacked_axes=config.stacked_axes,
  )
  return traverse_util.unflatten_dict(pruned, sep="/"), lora_config
