"""LoRA and rsLoRA, with Hugging Face PEFT's init options (default, gaussian, random, PiSSA).

Papers:
  * Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of Large Language
    Models", 2021, arXiv:2106.09685.
  * Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023, arXiv:2312.03732.
  * Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
    Models", 2024, arXiv:2404.02948.
Reference implementation followed: Hugging Face PEFT ``peft/tuners/lora`` (``LoraLayer.update_layer``,
``reset_lora_parameters``, ``pissa_init``, ``Linear/Embedding/Conv2d.get_delta_weight``).

Math, on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W + b``)::

    W' = W + s * a @ b,     a: (d_in, r),  b: (r, d_out),
    s  = alpha / r          (LoRA)   or   alpha / sqrt(r)   (rsLoRA, ``use_rslora=True``).

Activation-hook mode (``jaxpeft.adapters.factored``): ``y = x W + b + s * (drop(x) @ a) @ b``; dropout acts
on the adapter branch's input only, as in PEFT. The reparameterized mode cannot drop inputs and ignores
``dropout``.

Transposition rule to and from PEFT (PyTorch ``y = x Wᵀ + b``, ``W_t: (d_out, d_in)``)::

    Linear:     a = lora_A.weight.T            (lora_A.weight: (r, d_in))
                b = lora_B.weight.T            (lora_B.weight: (d_out, r))
    Embedding:  a = lora_embedding_A.T         (lora_embedding_A: (r, vocab))
                b = lora_embedding_B.T         (lora_embedding_B: (features, r))
    Conv2d:     a = lora_A.weight.permute(2, 3, 1, 0).reshape(kh*kw*c_in, r)   ((r, c_in, kh, kw) -> Flax fold)
                b = lora_B.weight[:, :, 0, 0].T                               ((c_out, r, 1, 1))
    base conv kernel: Flax (kh, kw, c_in, c_out) = torch weight.permute(2, 3, 1, 0).

Inits (``config.init``), matching PEFT's ``init_lora_weights``:
  * ``"default"`` (PEFT ``True``): ``a ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` -- PyTorch's
    ``kaiming_uniform_(a=sqrt(5))``, whose bound is ``sqrt(6/((1+5) d_in))`` (Flax's ``he_uniform`` would be
    sqrt(6) times larger) -- and ``b = 0``. Conv: ``d_in = c_in*kh*kw``, as PyTorch's fan-in.
  * ``"gaussian"``: ``a ~ N(0, (1/r)^2)``, ``b = 0``.
  * ``"random"`` (PEFT ``False``, for tests): ``a`` as default, ``b ~ U(-1/sqrt(r), 1/sqrt(r))`` (PyTorch's
    default ``Linear(r, d_out)`` init), so the adapter is non-zero at init.
  * Embedding tables (leaf ``embedding``): PEFT reverses the init, ``a = 0`` and ``b ~ N(0, 1)`` for
    ``"default"`` and ``"gaussian"``; ``"random"`` draws both from ``N(0, 1)``.
  * ``"pissa"``: with ``W = U S Vᵀ``, ``a = U_r sqrt(S_r/s)``, ``b = sqrt(S_r/s) V_rᵀ`` so ``s a b`` is the best
    rank-r approximation of ``W``; the base must become the residual ``W - s a b``
    (``reparam.init_with_base`` returns it). ``"pissa_niter_<k>"``: the same from a randomized SVD with
    ``k`` subspace iterations (Halko et al. 2011, like ``torch.svd_lowrank``; the random sketch is a JAX
    draw, so it is not bit-identical to PyTorch's). Requires ``r <= min(d_in, d_out)``.

Deviations from PEFT: PEFT runs PiSSA on Linear layers only; here it runs on any folded kernel (conv and
DenseGeneral included). PEFT's ``lora_bias`` option is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.peft_mapping import Layout, PeftMapping, Rule, input_side, rank_fields, transpose
from jaxpeft.canonical_dot import matmul

_INITS = ("default", "gaussian", "random")


def _is_pissa(init: str) -> bool:
  return init == "pissa" or init.startswith("pissa_niter_")


def _randomized_svd(rng: jax.Array, w: jax.Array, rank: int, niter: int):
  """Top-``rank`` SVD of ``w`` by randomized subspace iteration (Halko, Martinsson, Tropp 2011, alg. 4.4)."""
  q, _ = jnp.linalg.qr(w @ jax.random.normal(rng, (w.shape[1], rank), jnp.float32))
  for _ in range(niter):
    q, _ = jnp.linalg.qr(w.T @ q)
    q, _ = jnp.linalg.qr(w @ q)
  u_small, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
  return q @ u_small, s, vt


def lora_factors_init(rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
  """The LoRA factors ``{"a": (d_in, r), "b": (r, d_out)}`` for ``target.init`` (see the module docstring)."""
  d_in, d_out = target.matrix_shape
  r = target.rank
  key_a, key_b = jax.random.split(rng)
  if _is_pissa(target.init):
    if target.init == "pissa":
      u, s, vt = jnp.linalg.svd(kernel, full_matrices=False)
    else:
      u, s, vt = _randomized_svd(rng, kernel, r, int(target.init.removeprefix("pissa_niter_")))
    root = jnp.sqrt(s[:r] / target.scaling)
    return {"a": u[:, :r] * root, "b": root[:, None] * vt[:r]}
  if target.kind == "embedding":
    b = jax.random.normal(key_b, (r, d_out), jnp.float32)
    a = (
        jax.random.normal(key_a, (d_in, r), jnp.float32)
        if target.init == "random"
        else jnp.zeros((d_in, r), jnp.float32)
    )
    return {"a": a, "b": b}
  if target.init == "gaussian":
    a = jax.random.normal(key_a, (d_in, r), jnp.float32) / r
  else:
    bound = 1.0 / jnp.sqrt(d_in)
    a = jax.random.uniform(key_a, (d_in, r), jnp.float32, -bound, bound)
  if target.init == "random":
    bound = 1.0 / jnp.sqrt(r)
    b = jax.random.uniform(key_b, (r, d_out), jnp.float32, -bound, bound)
  else:
    b = jnp.zeros((r, d_out), jnp.float32)
  return {"a": a, "b": b}


class LoRAFactors(AdapterMethod):
  """The target checks of the methods built on LoRA's factors ``a (d_in, r)``, ``b (r, d_out)``.

  LoRA, DoRA and mixed_batch: a kernel with input axes, ``rank <= min(d_in, d_out)`` and one of LoRA's inits.
  """

  needs_matrix = True
  bounded_rank = True

  def validate(self, target: Target) -> None:
    if not (target.init in _INITS or _is_pissa(target.init)):
      raise ValueError(
          f"{target.path}: unknown init {target.init!r}; expected one of {_INITS}, 'pissa' or 'pissa_niter_<k>'."
      )
    if target.init.startswith("pissa_niter_") and not target.init.removeprefix("pissa_niter_").isdigit():
      raise ValueError(f"{target.path}: init {target.init!r} must look like 'pissa_niter_4'.")


# PEFT LoraConfig (``peft_type`` LORA; rsLoRA and every LoRA init are plain LoRA weights), ``in(x)`` =
# ``peft_mapping.input_side`` with ``c = c_in``: a -> lora_A.weight = in(a) (r, c_in[, *window]);
# b -> lora_B.weight = b.T (out, r[, 1, 1]); Embed: a -> lora_embedding_A = a.T (r, vocab), b -> lora_embedding_B =
# b.T (features, r); DoRA's m -> lora_magnitude_vector (out,) (conv: (1, out, 1, 1)).
def _lora_rules(layout: Layout, target: Target | None) -> dict[str, Rule]:
  if layout.kind == "embedding":
    rules = {"a": Rule("lora_embedding_A", transpose), "b": Rule("lora_embedding_B", transpose)}
  else:
    rules = {
        "a": Rule("lora_A.weight", lambda x: input_side(x, layout.window, layout.c_in)),
        "b": Rule("lora_B.weight", lambda x: x.T.reshape(layout.d_out, -1, *layout.ones)),
    }
  conv = layout.kind == "conv"
  rules["m"] = Rule("lora_magnitude_vector", lambda x: x.reshape((1, -1, *layout.ones) if conv else (-1,)))
  return rules


def lora_config_fields(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict:
  """PEFT ``LoraConfig`` fields (shared with DoRA, which sets ``use_dora``)."""
  fields = rank_fields(config, targets, modules, rslora_native=True)
  return {
      **fields,
      "lora_alpha": fields.pop("alpha"),
      "use_rslora": config.use_rslora,
      "use_dora": config.method == "dora",
      "lora_dropout": config.dropout,
      "init_lora_weights": True,
      "bias": "none",
      "fan_in_fan_out": False,
  }


# PEFT's LoraConfig without use_dora (DoRA's mapping is this one with use_dora).
LORA_PEFT = PeftMapping(
    "LORA",
    ("linear", "conv", "embedding"),
    _lora_rules,
    lora_config_fields,
    claims=lambda peft_config: not peft_config.get("use_dora"),
    alpha_field="lora_alpha",
    dropout_field="lora_dropout",
)


@register_method("lora")
class LoRA(LoRAFactors):
  """``W' = W + s a b`` (LoRA; rsLoRA scaling with ``use_rslora``). See the module docstring."""

  peft = LORA_PEFT

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    return lora_factors_init(rng, kernel, target)

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return target.scaling * (leaves["a"] @ leaves["b"])

  def modifies_base(self, target: Target) -> bool:
    return _is_pissa(target.init)

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return matmul(matmul(x, leaves["a"]) * target.scaling, leaves["b"])
