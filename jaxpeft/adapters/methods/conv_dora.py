"""DoRA-C / convDoRA and CP-DoRA: DoRA's magnitude/direction split over the LoRA-C and CP-LoRA updates.

Paper: Minoccheri, Hodgman, Ma, Merchant, Wittrup, Williamson, Najarian, "LoRA-based methods on Unet for
transfer learning in Subarachnoid Hematoma Segmentation", 2025, arXiv:2508.01772 (introduces the three
variants; no code released). DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
arXiv:2402.09353. Reference implementations followed: ``jaxpeft.adapters.methods.dora`` (= Hugging Face PEFT's DoRA,
``peft/tuners/lora/dora.py``) for the magnitude/direction part, ``jaxpeft.adapters.methods.conv_lora`` (loralib
ConvLoRA) and ``jaxpeft.adapters.methods.cp_lora`` for the update.

Math, on the folded Flax conv kernel ``W: (kh*kw*I, O)`` (one column per output channel)::

    V  = W + Delta W                       Delta W from the variant (same leaves, init and scale s)
    W' = V * m / stop_gradient(||V||_col)  ||.||_col: per output channel, over (kh, kw, I)
    m  : (O,) trainable, initialised to ||W + Delta W_0||_col (= ||W||_col for the zero-init updates)

    options={"variant": ...}   "loralib"    -> DoRA-C / convDoRA (default; update of conv_lora variant "loralib",
                                                the released LoRA-C / convLoRA code)
                               "layer_rank" -> the same over conv_lora variant "layer_rank" (inner width r)
                               "cp"         -> CP-DoRA (update of cp_lora)

The per-output-channel norm is PEFT's conv DoRA norm (PyTorch ``W_t: (O, I, kh, kw)``, norm over dims
``(1, 2, 3)``; PyTorch to Flax: ``K = W_t.permute(2, 3, 1, 0)``). As in PEFT and the DoRA paper, the norm is
detached in backpropagation. Param count: the variant's count plus ``O``.

[reconstructed] The paper's body and code were not found (see ``cp_lora`` for what was searched): "DoRA
variants (DoRA-C, convDoRA, CP-DoRA) that decompose weight matrices into magnitude and directional components"
(abstract) is implemented as standard DoRA (the NVlabs / PEFT definition, with PEFT's per-output-channel conv
norm) with the variant's update in place of ``s B A``. Unmerge is impossible from merged weights alone (as for
DoRA): keep the base params.
"""

from __future__ import annotations

import jax

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.adapters.methods.conv_lora import ConvLoRA, check_variant
from jaxpeft.adapters.methods.cp_lora import CPLoRA
from jaxpeft.adapters.methods.dora import column_norm, magnitude_scale

_UPDATES: dict[str, AdapterMethod] = {"loralib": ConvLoRA(), "layer_rank": ConvLoRA(), "cp": CPLoRA()}


def _update(target: Target) -> AdapterMethod:
  check_variant(target, tuple(_UPDATES))
  return _UPDATES[target.option("variant")]


@register_method("conv_dora")
class ConvDoRA(AdapterMethod):
  """``W' = m * (W + Delta W) / ||W + Delta W||_col`` with a conv/CP update. See the module docstring."""

  option_defaults = {"variant": "loralib"}

  def validate(self, target: Target) -> None:
    _update(target).check_target(target)

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    update = _update(target)
    leaves = update.init(rng, kernel, target)
    leaves["m"] = column_norm(kernel + update.delta(leaves, target))
    return leaves

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    v = kernel + _update(target).delta(leaves, target)
    return v * magnitude_scale(v, leaves)

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    raise ValueError(
        f"{target.path}: DoRA-C / convDoRA / CP-DoRA cannot be unmerged from merged weights (the norm "
        "||W + Delta W|| is lost in the merge). Keep the base params: reparam.apply/merge never modify them."
    )
