"""The Gemma 3 tokenizer as a `tokenizers.Tokenizer`, from GGUF metadata or a Hugging Face folder.

No torch and no sentencepiece at run time. From a Hugging Face folder the tokenizer is its
`tokenizer.json`. A GGUF file stores only the vocabulary (`tokenizer.ggml.tokens`, token types,
scores and special ids); the tokenizer is rebuilt as the same pipeline as transformers'
`GemmaTokenizer` fed by its GGUF converter (`integrations/gguf/gguf_tokenizer_mapping.py`,
`gemma_tokenizer`), so both give the same ids:

* normalizer: ' ' -> '\u2581'; a BPE model with byte fallback ('<0xNN>' tokens) and fused unknowns;
  decoder: '\u2581' -> ' ', byte fallback, fuse.
* Tokens made only of 2+ spaces are stored as spaces in the file; they are respelled with '\u2581'.
* The file has no merges. They are recovered from the vocabulary: every split of a token into two
  tokens of the vocabulary is a merge, ranked by the token's position in the file (Gemma's scores
  do not follow its merge order), and among splits of one token the longer left piece first.
* Control tokens (type 3: '<bos>', '<start_of_turn>', ...) are special added tokens; user-defined
  ones (type 4: runs of newlines, ...) plain added tokens, matched whole.
* `<bos>` is prepended when the file says `tokenizer.ggml.add_bos_token` (and `<eos>` appended
  with `add_eos_token`).
"""

import pathlib

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from jaxpeft.models import gemma3, gguf_file

_SPACE = "\u2581"
_CONTROL, _USER_DEFINED = 3, 4


def _merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
  merges = []
  for token in tokens:
    merges.extend(
        (token[:k], token[k:]) for k in range(len(token) - 1, 0, -1) if token[:k] in vocab and token[k:] in vocab
    )
  return merges


def _with_bos_eos(tokenizer: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> tokenizers.Tokenizer:
  single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
  pair = single + " " + " ".join([f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
  special = [(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t]
  tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
  return tokenizer


def from_gguf(path: str | pathlib.Path) -> tokenizers.Tokenizer:
  """The tokenizer described by a Gemma GGUF file's metadata (see the module docstring)."""
  file = gguf_file.GGUFFile(path)
  meta = file.metadata
  if meta.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.tokens" not in meta:
    raise ValueError(
        f"{file.path} has tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}; a Gemma GGUF"
        " describes a sentencepiece ('llama') vocabulary. Pass a Gemma 3 GGUF file."
    )
  stored = list(meta["tokenizer.ggml.tokens"])
  types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(stored))))
  tokens = [_SPACE * len(t) if len(t) > 1 and not t.strip(" ") else t for t in stored]
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = stored[int(meta.get("tokenizer.ggml.unknown_token_id", 3))]
  tokenizer = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=_merges(tokens, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
  )
  tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
  tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
  tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
  tokenizer.add_special_tokens(
      [
          tokenizers.AddedToken(t, normalized=False, special=True)
          for t, kind in zip(stored, types)
          if kind == _CONTROL
      ]
  )
  tokenizer.add_tokens(
      [
          tokenizers.AddedToken(t, normalized=False, special=False)
          for t, kind in zip(stored, types)
          if kind == _USER_DEFINED and t in vocab
      ]
  )
  token = lambda key: (
      stored[int(meta[f"tokenizer.ggml.{key}_token_id"])]
      if meta.get(f"tokenizer.ggml.add_{key}_token", False)
      else None
  )
  return _with_bos_eos(tokenizer, token("bos"), token("eos"))


def from_hf(folder: str | pathlib.Path) -> tokenizers.Tokenizer:
  """The `tokenizer.json` of a Hugging Face folder."""
  file = pathlib.Path(folder) / "tokenizer.json"
  if not file.exists():
    raise FileNotFoundError(f"{folder} has no tokenizer.json; pass a Hugging Face Gemma 3 folder or a GGUF file.")
  return tokenizers.Tokenizer.from_file(str(file))


def load(checkpoint: str | pathlib.Path) -> tokenizers.Tokenizer:
  """`from_hf` for a folder, `from_gguf` for a file."""
  return from_hf(checkpoint) if pathlib.Path(checkpoint).is_dir() else from_gguf(checkpoint)


def check_vocabulary(tokenizer: tokenizers.Tokenizer, config: gemma3.Gemma3Config) -> None:
  """Raises ValueError if the tokenizer can emit ids the model has no embedding for."""
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > config.vocab_size:
    raise ValueError(
        f"The tokenizer has {size} tokens but the model's vocabulary has {config.vocab_size}: they"
        " do not belong together. Load the tokenizer from the same checkpoint as the model."
    )
