"""Soft prompts: prompt tuning (text) and visual prompt tuning (VPT shallow / deep).

Papers:
  * Lester, Al-Rfou, Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021,
    arXiv:2104.08691. Init options follow Hugging Face PEFT (``peft/tuners/prompt_tuning``:
    ``PromptEmbedding``, ``PromptTuningInit.RANDOM`` / ``SAMPLE_VOCAB``).
  * Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim, "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119.
    Reference implementation followed: KMnP/vpt (``src/models/vit_prompt/vit.py`` ``PromptedTransformer``).

Prompt tuning (method ``"prompt_tuning"``): the target is the ``embedding`` table of a linen ``Embed``
(``(vocab, d)``); its call's output ``E(x)`` of shape ``(..., T, d)`` becomes::

    [P; E(x)]  of shape (..., p + T, d),     P: (p, d) trainable ("prompt"),  p = config.rank

Init (``config.init``): ``"default"`` = PEFT's RANDOM (``torch.nn.Embedding``'s ``N(0, 1)``);
``"sample_vocab"`` = rows of the (frozen) embedding table drawn uniformly at random (PEFT SAMPLE_VOCAB).
Parameters: ``p d``. Not mergeable. The model must accept the longer sequence: extend the attention mask
(and position ids, where the model adds them after the embedding) by ``p`` -- the hook cannot see them.

VPT (method ``"vpt"``): the target is a 1-D leaf of width ``d`` (e.g. the first LayerNorm's ``scale``)
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

Usage (both): ``with houlsby.intercept(params, adapter_params, config): model.apply(...)`` (the
module-hook mechanism, see ``jaxpeft.adapters.houlsby``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.houlsby import ModuleHookMethod

PROMPT = "prompt"


def _prepend(prompt: jax.Array, x: jax.Array, start: int, drop: int) -> jax.Array:
    """``[x[..., :start, :], prompt, x[..., start + drop:, :]]`` along the token axis (-2)."""
    p = jnp.broadcast_to(prompt.astype(x.dtype), x.shape[:-2] + prompt.shape)
    return jnp.concatenate([x[..., :start, :], p, x[..., start + drop:, :]], axis=-2)


@register_method("prompt_tuning")
class PromptTuning(ModuleHookMethod):
    """``[P; Embed(x)]``. See the module docstring."""

    _inits = ("default", "sample_vocab")

    def validate(self, target: Target) -> None:
        super().validate(target)
        if target.kind != "embedding":
            raise ValueError(f"{target.path}: prompt tuning targets the 'embedding' table of a linen Embed.")
        if target.init not in self._inits:
            raise ValueError(f"{target.path}: unknown init {target.init!r}; expected one of {self._inits}.")

    def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
        if target.init == "sample_vocab":
            rows = jax.random.randint(rng, (target.rank,), 0, kernel.shape[0])
            return {PROMPT: kernel[rows]}
        return {PROMPT: jax.random.normal(rng, (target.rank, kernel.shape[1]), jnp.float32)}

    def hook(self, call, args, kwargs, leaves, target, call_index):
        return _prepend(leaves[PROMPT], call(*args, **kwargs), 0, 0)


@register_method("vpt")
class VisualPromptTuning(ModuleHookMethod):
    """Insert (first block) or replace (later blocks) ``p`` prompt tokens after the prefix tokens."""

    option_defaults = {"num_prefix_tokens": 1, "patch_size": 16}
    hook_levels_up = 1

    def validate(self, target: Target) -> None:
        super().validate(target)
        if target.fan_in_axes != 0 or len(target.layer_shape) != 1:
            raise ValueError(f"{target.path}: VPT targets a 1-D leaf of width d inside each prompted block (e.g. "
                             f"its first LayerNorm's scale), got per-layer shape {target.layer_shape}.")

    def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
        d = target.matrix_shape[1]
        bound = math.sqrt(6.0 / (3 * target.option("patch_size") ** 2 + d))
        return {PROMPT: jax.random.uniform(rng, (target.rank, d), jnp.float32, -bound, bound)}

    def hook(self, call, args, kwargs, leaves, target, call_index):
        if not args:
            raise ValueError(f"{target.path}: VPT needs the prompted block to receive its tokens as the first "
                             "positional argument.")
        x, rest = args[0], args[1:]
        k, p = target.option("num_prefix_tokens"), target.rank
        return call(_prepend(leaves[PROMPT], x, k, 0 if call_index == 0 else p), *rest, **kwargs)
