"""BitFit: fine-tune only the bias terms.

Paper: Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022, arXiv:2106.10199. Reference implementation: benzakenelad/BitFit, which
simply unfreezes the chosen bias parameters (all of them, or e.g. the query and MLP-intermediate biases);
Hugging Face PEFT has no BitFit tuner, so the tests check the closed form.

Math. For each targeted bias leaf ``bias`` (any 1-D per-layer leaf; select them with ``targets``, e.g.
``r".*/bias"`` or ``r".*(query|intermediate)/bias"`` for the paper's subset)::

    bias' = bias + delta,      delta: (d,) trained, initialised to 0  (so bias' = bias at init)

Training ``delta`` with the base frozen is exactly training the bias itself (same gradient, since
``d bias' / d delta = I``); keeping the offset separate lets the adapter be saved, merged and removed like
any other adapter. Trainable parameters per bias: ``d`` (its length). Merge: ``bias + delta``; unmerge:
exact up to rounding. The rank, alpha and init options are unused.

Limitation: BitFit here trains *existing* bias leaves; models without biases (LLaMA-style) have none to
target (PEFT's ``beft`` adds new value biases; that changes the model and is not done here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method


@register_method("bitfit")
class BitFit(AdapterMethod):
  """``bias' = bias + delta`` with ``delta = 0`` at init. See the module docstring."""

  inits = ("default",)
  layout = "bias"
  layout_hint = "BitFit trains bias vectors: narrow AdapterConfig.targets to them, e.g. targets=r'.*/bias'."

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    return {"delta": jnp.zeros((kernel.shape[1],), jnp.float32)}

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return leaves["delta"][None, :]
