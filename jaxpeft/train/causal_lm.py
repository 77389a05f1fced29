"""The causal-LM objective and metrics: next-token cross-entropy on the response tokens only.

With logits z (batch, T, vocab) of the model on `input_ids` x (batch, T) and the response mask m
(`loss_mask`, see `jaxpeft.data.causal_lm`), position t predicts x_{t+1}:

  loss = sum_{b, t < T-1} m_{b, t+1} * CE(z_{b, t}, x_{b, t+1}) / sum_{b, t < T-1} m_{b, t+1}

(the mean over response tokens of the whole batch, not a mean of per-example means). The prompt and the
padding never enter the loss. In packed rows (`segment_ids`, see `jaxpeft.data.causal_lm`) a target that starts
a new segment is never predicted from the previous segment: m_{b, t+1} counts only where segment_{b, t+1}
= segment_{b, t} (the prompt's first token is never a target anyway; this keeps it so for any mask). Evaluation sums the masked cross-entropy, the number of response tokens and
the correctly predicted (argmax) ones over the split; `finalize_eval` turns them into the held-out response
`loss`, `perplexity` = exp(loss) and next-token `accuracy`.

`generation_metrics` scores greedy continuations (`jaxpeft.models.generate`) of held-out prompts against
their references: `exact_match` (after whitespace normalisation) and `rouge_l`, the F1 of the longest
common subsequence of whitespace tokens (Lin, 2004, ROUGE-L with beta = 1), averaged over examples.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers

from jaxpeft.data import causal_lm as causal_lm_data
from jaxpeft.models import generate as generate_lib

Batch = dict[str, jax.Array]
INPUT_KEYS = ("input_ids", "attention_mask")


def _shifted(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits at t, target x_{t+1}, weight m_{t+1}) for t < T-1."""
  targets = batch["input_ids"][:, 1:]
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
  if "segment_ids" in batch:
    weights = weights * (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])
  return logits[:, :-1].astype(jnp.float32), targets, weights


def token_losses(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Per-position next-token cross-entropies (batch, T-1) and their weights (the shifted response mask)."""
  logits, targets, weights = _shifted(logits, batch)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets), weights


def loss(logits: jax.Array, batch: Batch) -> jax.Array:
  """The mean next-token cross-entropy over the batch's response tokens (see the module docstring)."""
  losses, weights = token_losses(logits, batch)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def train_metrics(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  """Next-token accuracy on the response tokens of a training batch."""
  logits, targets, weights = _shifted(logits, batch)
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(weights), 1.0)}


def eval_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  """Sums over a batch's response tokens (rows with `mask` 0, the padding rows of a split, count nothing)."""
  losses, weights = token_losses(logits, batch)
  weights = weights * batch["mask"].astype(jnp.float32)[:, None]
  correct = jnp.argmax(logits[:, :-1], -1) == batch["input_ids"][:, 1:]
  return {"loss": jnp.sum(losses * weights), "correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}


def finalize_eval(totals: dict[str, Any]) -> dict[str, float]:
  """Held-out response `loss`, `perplexity` and next-token `accuracy` from the summed `eval_sums`."""
  count = float(totals["count"])
  if count == 0:
    raise ValueError("The evaluation split has no response tokens; raise config.dataset.max_len.")
  mean = float(totals["loss"]) / count
  return {"loss": mean, "perplexity": float(np.exp(mean)), "accuracy": float(totals["correct"]) / count}


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F1 of two texts over whitespace tokens (longest common subsequence)."""
  a, b = prediction.split(), reference.split()
  if not a or not b:
    return float(a == b)
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  lcs = previous[-1]
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(a), lcs / len(b)
  return 2 * precision * recall / (precision + recall)


def greedy_responses(
    model: Any, params: Any, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str], *, max_new_tokens: int
) -> list[str]:
  """Greedy continuations of `prompts` (left-padded into one batch), decoded up to the end token."""
  pad, eos = causal_lm_data.pad_and_eos_ids(tokenizer)
  encoded = [e.ids for e in tokenizer.encode_batch(list(prompts))]
  width = max(map(len, encoded))
  ids = np.full((len(encoded), width), pad, np.int32)
  mask = np.zeros((len(encoded), width), np.int32)
  for row, tokens in enumerate(encoded):
    ids[row, width - len(tokens) :], mask[row, width - len(tokens) :] = tokens, 1
  init_cache = getattr(model, "init_cache", None) or functools.partial(_gemma3_cache, model)
  out = np.asarray(
      generate_lib.generate(
          model,
          {"params": params},
          jnp.asarray(ids),
          jnp.asarray(mask),
          max_new_tokens=max_new_tokens,
          init_cache=init_cache,
          stop_tokens=(eos,),
          pad_id=pad,
      )
  )
  return [tokenizer.decode([int(t) for t in row if t not in (pad, eos)]) for row in out]


def _gemma3_cache(model: Any, batch: int, max_len: int) -> Any:
  from jaxpeft.models import gemma3  # pylint: disable=import-outside-toplevel

  return gemma3.init_cache(model.config, batch, max_len, model.dtype)


def generation_metrics(
    model: Any,
    params: Any,
    tokenizer: tokenizers.Tokenizer,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    max_new_tokens: int,
) -> tuple[dict[str, float], list[str]]:
  """(`{exact_match, rouge_l}` averaged over the examples, the greedy responses)."""
  responses = greedy_responses(model, params, tokenizer, prompts, max_new_tokens=max_new_tokens)
  normal = lambda text: " ".join(text.split())
  metrics = {
      "exact_match": float(np.mean([normal(p) == normal(r) for p, r in zip(responses, references)])),
      "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(responses, references)])),
  }
  return metrics, responses


def held_out_generation(
    model: Any,
    params: Any,
    source: Sequence[dict[str, Any]],
    tokenizer_name: str,
    *,
    count: int,
    max_new_tokens: int,
) -> tuple[dict[str, float], list[dict[str, str]]]:
  """`generation_metrics` on the first `count` examples of a `{prompt, response}` split, and the samples.

  Returns the metrics (prefixed `generation_`) and, per example, its prompt, reference and greedy response.
  """
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  examples = [source[i] for i in range(min(count, len(source)))]
  prompts, references = [text(e["prompt"]) for e in examples], [text(e["response"]) for e in examples]
  metrics, responses = generation_metrics(
      model,
      params,
      causal_lm_data.load_tokenizer(tokenizer_name),
      prompts,
      references,
      max_new_tokens=max_new_tokens,
  )
  samples = [{"prompt": p, "reference": r, "response": g} for p, r, g in zip(prompts, references, responses)]
  return {f"generation_{k}": v for k, v in metrics.items()}, samples
