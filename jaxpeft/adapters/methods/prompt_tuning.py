"""Prompt tuning: trainable soft-prompt tokens prepended to a text model's token embeddings.

Paper: Lester, Al-Rfou, Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021,
arXiv:2104.08691. Init options follow Hugging Face PEFT (``peft/tuners/prompt_tuning``: ``PromptEmbedding``,
``PromptTuningInit.RANDOM`` / ``SAMPLE_VOCAB``). The visual variant (VPT) is ``jaxpeft.adapters.methods.vpt``.

Math (method ``"prompt_tuning"``): the target is the ``embedding`` table of a linen ``Embed``
(``(vocab, d)``); its call's output ``E(x)`` of shape ``(..., T, d)`` becomes::

    [P; E(x)]  of shape (..., p + T, d),     P: (p, d) trainable ("prompt"),  p = config.rank

Init (``config.init``): ``"default"`` = PEFT's RANDOM (``torch.nn.Embedding``'s ``N(0, 1)``);
``"sample_vocab"`` = rows of the (frozen) embedding table drawn uniformly at random (PEFT SAMPLE_VOCAB).
Parameters: ``p d``. Not mergeable. The model must accept the longer sequence: extend the attention mask
(and position ids, where the model adds them after the embedding) by ``p`` -- the hook cannot see them.
``jaxpeft.models.bert`` does so as PEFT does for BERT (``configs/minilm_text.py:prompt_tuning`` trains it).

Usage: ``with module_hooks.intercept(params, adapter_params, config): model.apply(...)`` (the module-hook
mechanism, see ``jaxpeft.adapters.module_hooks``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.module_hooks import ModuleHookMethod

PROMPT = "prompt"


def insert_tokens(prompt: jax.Array, x: jax.Array, start: int, drop: int) -> jax.Array:
  """``[x[..., :start, :], prompt, x[..., start + drop:, :]]`` along the token axis (-2)."""
  p = jnp.broadcast_to(prompt.astype(x.dtype), x.shape[:-2] + prompt.shape)
  return jnp.concatenate([x[..., :start, :], p, x[..., start + drop :, :]], axis=-2)


@register_method("prompt_tuning")
class PromptTuning(ModuleHookMethod):
  """``[P; Embed(x)]``. See the module docstring."""

  inits = ("default", "sample_vocab")

  def validate(self, target: Target) -> None:
    super().validate(target)
    if target.kind != "embedding":
      raise ValueError(f"{target.path}: prompt tuning targets the 'embedding' table of a linen Embed.")

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    if target.init == "sample_vocab":
      rows = jax.random.randint(rng, (target.rank,), 0, kernel.shape[0])
      return {PROMPT: kernel[rows]}
    return {PROMPT: jax.random.normal(rng, (target.rank, kernel.shape[1]), jnp.float32)}

  def hook(self, call, args, kwargs, leaves, target, call_index):
    return insert_tokens(leaves[PROMPT], call(*args, **kwargs), 0, 0)
