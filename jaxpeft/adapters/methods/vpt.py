"""Visual prompt tuning (VPT shallow / deep): trainable prompt tokens inserted into a ViT's blocks.

Paper: Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim, "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119.
Reference implementation followed: KMnP/vpt (``src/models/vit_prompt/vit.py`` ``PromptedTransformer``).

Math (method ``"vpt"``): the target is a 1-D leaf of width ``d`` (e.g. the first LayerNorm's ``scale``)
inside each transformer block to prompt; the hook wraps that leaf's parent, the block
(``hook_levels_up = 1``), and edits the block's input tokens ``x: (..., N, d)`` = ``[CLS, patches]``
(``k`` = option ``num_prefix_tokens`` leading tokens, default 1)::

    first prompted block (VPT-shallow, and layer 1 of VPT-deep):  x <- [x[:k], P_i, x[k:]]   (insert)
    every later prompted block (VPT-deep):                         x <- [x[:k], P_i, x[k+p:]] (replace)

so selecting only the first block is VPT-shallow and selecting all blocks is VPT-deep. Prompts get no
position embedding (they are inserted after it). "First" is decided by call order: the first hooked call of
each forward pass inserts (each pass calls every prompted block once, in order). Init as KMnP/vpt:
``U(-v, v)``, ``v = sqrt(6 / (3 * patch_size^2 + d))`` (option ``patch_size``, default 16: Xavier-uniform
computed as for the patch-embedding conv). Parameters: ``p d``
per prompted block (``L p d`` for deep), plus the task head. The reference's prompt dropout and
projection are not implemented.

Usage: ``with module_hooks.intercept(params, adapter_params, config): model.apply(...)`` (the module-hook
mechanism, see ``jaxpeft.adapters.module_hooks``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.module_hooks import ModuleHookMethod
from jaxpeft.adapters.methods.prompt_tuning import PROMPT, insert_tokens


@register_method("vpt")
class VisualPromptTuning(ModuleHookMethod):
  """Insert (first block) or replace (later blocks) ``p`` prompt tokens after the prefix tokens."""

  option_defaults = {"num_prefix_tokens": 1, "patch_size": 16}
  hook_levels_up = 1
  layout = "vector"
  layout_hint = "VPT targets a 1-D leaf of width d inside each prompted block (e.g. its first LayerNorm's scale)."

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    d = target.matrix_shape[1]
    bound = math.sqrt(6.0 / (3 * target.option("patch_size") ** 2 + d))
    return {PROMPT: jax.random.uniform(rng, (target.rank, d), jnp.float32, -bound, bound)}

  def hook(self, call, args, kwargs, leaves, target, call_index):
    if not args:
      raise ValueError(
          f"{target.path}: VPT needs the prompted block to receive its tokens as the first " "positional argument."
      )
    x, rest = args[0], args[1:]
    k, p = target.option("num_prefix_tokens"), target.rank
    return call(insert_tokens(leaves[PROMPT], x, k, 0 if call_index == 0 else p), *rest, **kwargs)
