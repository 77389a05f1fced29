"""LoKr: low-rank Kronecker-product adaptation (LyCORIS).

Paper: Yeh, Hsieh, Gao, Yang, Oh, Gong, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning
to Model Evaluation", ICLR 2024, arXiv:2309.14859. Reference implementation followed: Hugging Face PEFT
``peft/tuners/lokr`` (``factorization``, ``LoKrLayer.update_layer / create_adapter_parameters /
reset_adapter_parameters*``, ``get_delta_weight``, ``make_kron``), itself after KohakuBlueleaf/LyCORIS.

Shapes. A layer with ``c_in = c*d`` input channels, ``c_out = a*b`` outputs and (for a conv) a window of
``k = kh*kw`` positions (``spatial_axes`` option: the number of leading window axes of each targeted leaf,
2 for a Flax ``Conv`` kernel ``(kh, kw, c_in, c_out)``, 0 for Dense) is factored by PEFT's rule
``(a, b) = factorization(c_out, f)``, ``(c, d) = factorization(c_in, f)`` (``f = decompose_factor`` option,
-1: the divisor pair closest to the square root, smaller factor first). Then, on the folded kernel
``(k*c_in, c_out)`` whose rows are ordered (window, c, d) and columns (a, b)::

    W'[(p, i, j), (m, n)] = W + s * w1[i, m] * w2[(p, j), n]       i.e. Delta = s * (w1 kron w2) for k = 1
    w1: (c, a)        or  w1_a (c, r) @ w1_b (r, a)   if decompose_both and r < max(a, c)/2
    w2: (k*d, b)      or  w2_a (k*d, r) @ w2_b (r, b)  if r < max(b, d)/2            (PEFT's rule)
    s = alpha / r  (alpha / sqrt(r) with use_rslora; PEFT always divides by r, even for full factors)

Transposition rule to and from PEFT (``Delta_torch = s kron(lokr_w1, lokr_w2)``, ``(c_out, c_in[, kh, kw])``)::

    w1 = lokr_w1.T                     w1_a = lokr_w1_b.T        w1_b = lokr_w1_a.T
    w2 = lokr_w2.T (Linear)            w2_a = lokr_w2_b.T        w2_b = lokr_w2_a.T
    Conv2d: w2 = lokr_w2.permute(2, 3, 1, 0).reshape(kh*kw*d, b);
            w2_a = lokr_w2_b.reshape(r, d, kh, kw).permute(2, 3, 1, 0).reshape(kh*kw*d, r)

Inits (``config.init``), PyTorch ``kaiming_uniform_(a=sqrt(5))`` = ``U(+-1/sqrt(fan_in))`` with the torch
tensor's fan-in:
  * ``"default"`` (PEFT ``init_weights=True``): ``w1 = 0`` (or ``w1_b = 0``, ``w1_a ~ U(+-1/sqrt(c))``); ``w2``
    (fan-in ``k*d``), ``w2_a`` (fan-in ``k*d``) and ``w2_b`` (fan-in ``r``) uniform. ``W' = W`` at init.
  * ``"lycoris"`` (PEFT ``init_weights="lycoris"``): ``w1`` / ``w1_a, w1_b`` and ``w2_b`` uniform, ``w2 = 0``
    (or ``w2_a = 0``) -- LyCORIS's choice of the zero factor.
  * ``"random"`` (PEFT ``init_weights=False``): everything uniform (for tests).

Trainable parameters per adapted matrix: ``|w1| + |w2|`` with ``|w1| = a*c`` (or ``r (a + c)`` with
``decompose_both``) and ``|w2| = k*d*b`` (or ``r (k*d + b)``); the typical case is ``a*c + r (k*d + b)``.
Merge: yes; unmerge: exact up to rounding.

Not implemented (deviations from PEFT): ``use_effective_conv2d`` (CP core for the window), ``rank_dropout``
and ``module_dropout`` (training-time regularisers the reparameterized mode cannot express).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.methods.loha import lycoris_config_fields
from jaxpeft.adapters.peft_mapping import (
    Layout,
    PeftMapping,
    Rule,
    flat,
    input_side,
    spatial_axes_option,
    transpose,
)

_INITS = ("default", "lycoris", "random")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """PEFT/LyCORIS's rule: ``(m, n)`` with ``m * n == dimension`` and ``m <= n``.

  With ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)``. Otherwise the divisor pair
  with the smallest sum (closest to sqrt) whose smaller member does not exceed ``factor`` (any, for -1).
  """
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  if factor == -1:
    factor = dimension
  m, n = 1, dimension
  while m < n:
    new_m = m + 1
    while dimension % new_m:
      new_m += 1
    new_n = dimension // new_m
    if new_m + new_n > m + n or new_m > factor:
      break
    m, n = new_m, new_n
  return (n, m) if m > n else (m, n)


def kron_shapes(target: Target) -> dict[str, int]:
  """``{"a", "b", "c", "d", "k"}`` of the module docstring for this target."""
  spatial = target.option("spatial_axes")
  layer = target.layer_shape
  window = math.prod(layer[:spatial])
  c_in, c_out = math.prod(layer[spatial : target.fan_in_axes]), math.prod(layer[target.fan_in_axes :])
  factor = target.option("decompose_factor")
  a, b = factorization(c_out, factor)
  c, d = factorization(c_in, factor)
  return {"a": a, "b": b, "c": c, "d": d, "k": window}


def _uses_full(target: Target, which: str) -> bool:
  s, r = kron_shapes(target), target.rank
  if which == "w1":
    return not (target.option("decompose_both") and r < max(s["a"], s["c"]) / 2)
  return not r < max(s["b"], s["d"]) / 2


def _uniform(key: jax.Array, shape: tuple[int, int], fan_in: int, zero: bool = False) -> jax.Array:
  if zero:
    return jnp.zeros(shape, jnp.float32)
  bound = 1.0 / fan_in**0.5
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


# PEFT LoKrConfig: w1 -> lokr_w1 = w1.T, w1_a -> lokr_w1_b = w1_a.T, w1_b -> lokr_w1_a = w1_b.T,
# w2_b -> lokr_w2_a = w2_b.T; w2 -> lokr_w2 = in_d(w2) (b, d[, *window]),
# w2_a -> lokr_w2_b = in_d(w2_a).reshape(r, -1) (in_d: the
# input side with ``c = d``, the second input factor of ``kron_shapes``).
def _lokr_rules(layout: Layout, target: Target | None) -> dict[str, Rule]:
  d = kron_shapes(target)["d"] if target is not None else 1  # the second input factor
  return {
      "w1": Rule("lokr_w1", transpose),
      "w1_a": Rule("lokr_w1_b", transpose),
      "w1_b": Rule("lokr_w1_a", transpose),
      "w2_b": Rule("lokr_w2_a", transpose),
      "w2": Rule("lokr_w2", lambda x: input_side(x, layout.window, d)),
      "w2_a": Rule("lokr_w2_b", lambda x: flat(input_side(x, layout.window, d))),
  }


def _lokr_config_fields(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict:
  options = dict(targets[0].options)
  return {
      **lycoris_config_fields(config, targets, modules),
      "decompose_both": options["decompose_both"],
      "decompose_factor": options["decompose_factor"],
  }


def _lokr_options(
    peft_config: Mapping[str, Any], paths: Mapping[str, str], leaves: Mapping[str, Any], conv_paths: Sequence[str]
) -> dict[str, Any]:
  return {
      **spatial_axes_option(leaves, conv_paths),
      "decompose_both": peft_config.get("decompose_both", False),
      "decompose_factor": peft_config.get("decompose_factor", -1),
  }


_PEFT = PeftMapping("LOKR", ("linear", "conv"), _lokr_rules, _lokr_config_fields, _lokr_options)


@register_method("lokr")
class LoKr(AdapterMethod):
  """``W' = W + s * (w1 kron w2)`` (window axes carried by ``w2``). See the module docstring."""

  peft = _PEFT

  inits = _INITS
  layout = "windowed"

  option_defaults = {"decompose_both": False, "decompose_factor": -1, "spatial_axes": 0}

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    s, r = kron_shapes(target), target.rank
    k = jax.random.split(rng, 4)
    zero_w1 = target.init == "default"
    zero_w2 = target.init == "lycoris"
    leaves = {}
    if _uses_full(target, "w1"):
      leaves["w1"] = _uniform(k[0], (s["c"], s["a"]), s["c"], zero_w1)
    else:
      leaves["w1_a"] = _uniform(k[0], (s["c"], r), s["c"])
      leaves["w1_b"] = _uniform(k[1], (r, s["a"]), r, zero_w1)
    if _uses_full(target, "w2"):
      leaves["w2"] = _uniform(k[2], (s["k"] * s["d"], s["b"]), s["k"] * s["d"], zero_w2)
    else:
      leaves["w2_a"] = _uniform(k[2], (s["k"] * s["d"], r), s["k"] * s["d"], zero_w2)
      leaves["w2_b"] = _uniform(k[3], (r, s["b"]), r)
    return leaves

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    s = kron_shapes(target)
    w1 = leaves["w1"] if "w1" in leaves else leaves["w1_a"] @ leaves["w1_b"]
    w2 = leaves["w2"] if "w2" in leaves else leaves["w2_a"] @ leaves["w2_b"]
    w2 = w2.reshape(s["k"], s["d"], s["b"])
    return target.scaling * jnp.einsum("ia,pjb->pijab", w1, w2).reshape(target.matrix_shape)
