"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (learned rescaling vectors).

Paper: Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel, "Few-Shot Parameter-Efficient Fine-Tuning is Better
and Cheaper than In-Context Learning", NeurIPS 2022, arXiv:2205.05638 (authors' code: r-three/t-few).
Reference implementation followed: Hugging Face PEFT ``peft/tuners/ia3`` (``IA3Layer.update_layer``,
``Linear/_ConvNd.merge / unmerge / forward``), which generalises the paper's ``l_k, l_v, l_ff`` to any layer.

Math. The paper rescales activations: keys and values ``k' = l_k * k``, ``v' = l_v * v`` (a layer's
*output*) and the feed-forward hidden state before the down projection (that layer's *input*). As a
reparameterization of the folded ``(d_in, d_out)`` kernel ``W`` (Flax layout ``y = x W + bias``)::

    output mode:       W' = W * l[None, :]             l: (d_out,)   (x W') = l * (x W)
    feedforward mode:  W' = W * l[:, None]             l: (c_in,)    (x W') = (l * x) W

In output mode the layer's bias is rescaled too, as in PEFT (``y = l * (x W + bias)``)::

    output mode:       bias' = l * bias            feedforward mode: bias' = bias

(the core's ``adapts_bias`` hook; the bias is the kernel's sibling leaf ``bias``, if the layer has one).

A target is in feedforward mode when its path fully matches the ``feedforward`` option (a regex, PEFT's
``feedforward_modules``; default ``None``: no target). For a conv kernel ``(kh, kw, c_in, c_out)`` set the
``spatial_axes`` option (2): the input vector then has length ``c_in`` and is broadcast over the window,
as PEFT's ``(1, c_in, 1, 1)`` vector on ``nn.Conv2d``.

Init (``config.init``): ``"default"``: ``l = 1`` (PEFT ``init_ia3_weights=True``, ``W' = W``); ``"random"``:
``l ~ N(0, 1)`` (PEFT ``init_ia3_weights=False``, for tests). No scaling hyperparameters (rank and alpha
are unused).

Trainable parameters per adapted matrix: ``d_out`` (output mode) or ``c_in`` (feedforward mode).
Merge: yes (the rescaled kernel, and in output mode the rescaled bias). Unmerge: ``W = W' / l`` (and
``bias = bias' / l``) -- exact division here (PEFT adds ``1e-8`` to ``l``), undefined where an entry of ``l``
is 0 (it yields inf/nan: keep the base params instead).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.peft_mapping import Layout, PeftMapping, Rule, spatial_axes_option

_INITS = ("default", "random")


def is_feedforward(target: Target) -> bool:
  """Whether ``target`` rescales its input (``feedforward`` option matches its path) or its output."""
  pattern = target.option("feedforward")
  return pattern is not None and re.fullmatch(pattern, target.path) is not None


def _windowed(kernel: jax.Array, target: Target) -> jax.Array:
  """The folded kernel as ``(window, c_in, d_out)``."""
  spatial = target.option("spatial_axes")
  window = math.prod(target.layer_shape[:spatial])
  return kernel.reshape(window, -1, kernel.shape[-1])


def _scale(kernel: jax.Array, scale: jax.Array, target: Target) -> jax.Array:
  if not is_feedforward(target):
    return kernel * scale
  return (_windowed(kernel, target) * scale[None, :, None]).reshape(kernel.shape)


# PEFT IA3Config: l -> ia3_l, output mode (out, 1), feedforward mode (1, in), conv (1, c, 1, 1).
def _ia3_rules(layout: Layout, target: Target | None) -> dict[str, Rule]:
  feedforward = target is not None and is_feedforward(target)
  shape = (1, -1, *layout.ones) if layout.kind == "conv" else ((1, -1) if feedforward else (-1, 1))
  return {"l": Rule("ia3_l", lambda x: x.reshape(shape))}


def _ia3_config_fields(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict:
  feedforward = [modules[t.path] for t in targets if is_feedforward(t)]
  return {"feedforward_modules": "|".join(re.escape(n) for n in feedforward), "init_ia3_weights": True}


def _is_peft_feedforward(spec: Any, module: str) -> bool:
  """PEFT's ``feedforward_modules``: a string is ``re.fullmatch``ed, a list entry is a suffix of the name."""
  if spec is None:
    return False
  if isinstance(spec, str):
    return re.fullmatch(spec, module) is not None
  return any(module.endswith(key) for key in spec)


def _ia3_options(
    peft_config: Mapping[str, Any], paths: Mapping[str, str], leaves: Mapping[str, Any], conv_paths: Sequence[str]
) -> dict[str, Any]:
  feedforward = [p for p, m in paths.items() if _is_peft_feedforward(peft_config.get("feedforward_modules"), m)]
  return {
      **spatial_axes_option(leaves, conv_paths),
      "feedforward": "|".join(re.escape(p) for p in feedforward) or None,
  }


_PEFT = PeftMapping("IA3", ("linear", "conv"), _ia3_rules, _ia3_config_fields, _ia3_options)


@register_method("ia3")
class IA3(AdapterMethod):
  """``W' = W * l`` on the output (columns) or, for feedforward targets, the input (rows) of the kernel."""

  peft = _PEFT

  inits = _INITS
  layout = "windowed"

  option_defaults = {"feedforward": None, "spatial_axes": 0}
  adapts_bias = True

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    size = _windowed(kernel, target).shape[1] if is_feedforward(target) else kernel.shape[1]
    if target.init == "random":
      return {"l": jax.random.normal(rng, (size,), jnp.float32)}
    return {"l": jnp.ones((size,), jnp.float32)}

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return _scale(kernel, leaves["l"], target)

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return _scale(merged, 1.0 / leaves["l"], target)

  def apply_bias(self, bias: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return bias if is_feedforward(target) else leaves["l"] * bias

  def unmerge_bias(self, merged_bias: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return merged_bias if is_feedforward(target) else merged_bias / leaves["l"]

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    if is_feedforward(target):
      return (x * (leaves["l"] - 1.0)) @ kernel
    return (x @ kernel) * (leaves["l"] - 1.0)
