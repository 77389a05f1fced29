"""LoHa: low-rank Hadamard-product adaptation (from FedPara, as packaged by LyCORIS).

Papers: Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", ICLR 2022, arXiv:2108.06098; Yeh, Hsieh, Gao, Yang, Oh, Gong, "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024, arXiv:2309.14859.
Reference implementation followed: Hugging Face PEFT ``peft/tuners/loha`` (``LoHaLayer.create_adapter_parameters``,
``reset_adapter_parameters(_random)``, ``get_delta_weight``, ``HadaWeight``), itself after KohakuBlueleaf/LyCORIS.

Math, on the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W + bias``)::

    W' = W + s * (a1 @ b1) * (a2 @ b2)        (* elementwise; rank(Delta) <= r^2)
    a1, a2: (d_in, r)   b1, b2: (r, d_out)    s = alpha / r   (alpha / sqrt(r) with use_rslora)

Transposition rule to and from PEFT (``hada_w1_a: (d_out, r)``, ``hada_w1_b: (r, d_in)``, same for ``w2``)::

    a1 = hada_w1_b.T   b1 = hada_w1_a.T   a2 = hada_w2_b.T   b2 = hada_w2_a.T
    Conv2d (PEFT's default use_effective_conv2d=False, hada_w*_b: (r, c_in*kh*kw) in torch order):
    a_i = hada_wi_b.reshape(r, c_in, kh, kw).permute(2, 3, 1, 0).reshape(kh*kw*c_in, r)

(The Hadamard product commutes with the row permutation between PyTorch's ``(c_in, kh, kw)`` and Flax's
``(kh, kw, c_in)`` fold, so conv kernels need no special case.)

Inits (``config.init``), as PEFT with PyTorch's ``kaiming_uniform_(a=sqrt(5))`` (bound ``1/sqrt(fan_in)``,
fan-in = the torch tensor's second axis):
  * ``"default"`` (PEFT ``init_weights=True``): ``b1, b2 ~ U(+-1/sqrt(r))`` (from ``hada_w*_a (d_out, r)``),
    ``a1 ~ U(+-1/sqrt(d_in))``, ``a2 = 0`` (PEFT zeros ``hada_w2_b``), so ``W' = W`` at init.
  * ``"random"`` (PEFT ``init_weights=False``): ``a2 ~ U(+-1/sqrt(d_in))`` too.

Trainable parameters per adapted matrix: ``2 r (d_in + d_out)``. Merge: yes; unmerge: exact up to rounding.

Not implemented (documented deviations from PEFT): ``use_effective_conv2d`` (the Tucker/CP conv core),
``rank_dropout`` and ``module_dropout`` (training-time regularisers that the reparameterized mode cannot
express). The delta is built with ``jax.checkpoint`` so the two ``(d_in, d_out)`` factor products are
recomputed in the backward pass instead of stored (PEFT's ``HadaWeight`` custom backward does the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.peft_mapping import Layout, PeftMapping, Rule, flat, input_side, rank_fields, transpose

_INITS = ("default", "random")


def _uniform(key: jax.Array, shape: tuple[int, int], fan_in: int) -> jax.Array:
  """PyTorch ``kaiming_uniform_(a=sqrt(5))``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / fan_in**0.5
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


@jax.checkpoint
def _hadamard_delta(a1: jax.Array, b1: jax.Array, a2: jax.Array, b2: jax.Array, scale: float) -> jax.Array:
  return scale * (a1 @ b1) * (a2 @ b2)


def lycoris_config_fields(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict:
  """PEFT's LyCORIS config fields (LoHa, LoKr): ranks, alphas (rsLoRA folded into alpha), no dropouts."""
  return {
      **rank_fields(config, targets, modules, rslora_native=False),
      "init_weights": True,
      "use_effective_conv2d": False,
      "rank_dropout": 0.0,
      "module_dropout": 0.0,
  }


# PEFT LoHaConfig: a1, a2 -> hada_w1_b, hada_w2_b = in(a).reshape(r, -1); b1, b2 -> hada_w1_a, hada_w2_a = b.T.
def _loha_rules(layout: Layout, target: Target | None) -> dict[str, Rule]:
  a_side = lambda x: flat(input_side(x, layout.window, layout.c_in))
  return {
      "a1": Rule("hada_w1_b", a_side),
      "b1": Rule("hada_w1_a", transpose),
      "a2": Rule("hada_w2_b", a_side),
      "b2": Rule("hada_w2_a", transpose),
  }


_PEFT = PeftMapping("LOHA", ("linear", "conv"), _loha_rules, lycoris_config_fields)


@register_method("loha")
class LoHa(AdapterMethod):
  """``W' = W + s (a1 b1) * (a2 b2)``. See the module docstring."""

  peft = _PEFT

  inits = _INITS
  needs_matrix = True

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    d_in, d_out = target.matrix_shape
    r = target.rank
    k = jax.random.split(rng, 4)
    a2 = _uniform(k[3], (d_in, r), d_in) if target.init == "random" else jnp.zeros((d_in, r), jnp.float32)
    return {
        "a1": _uniform(k[0], (d_in, r), d_in),
        "b1": _uniform(k[1], (r, d_out), r),
        "a2": a2,
        "b2": _uniform(k[2], (r, d_out), r),
    }

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return _hadamard_delta(leaves["a1"], leaves["b1"], leaves["a2"], leaves["b2"], target.scaling)
