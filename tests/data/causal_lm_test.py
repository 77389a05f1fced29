"""Tests of jaxpeft.data.causal_lm: prompt + response + eos, padded, with the loss mask on the response."""

import numpy as np
import pytest

from jaxpeft.data import causal_lm


def test_byte_tokenizer_ids_are_the_bytes_shifted_by_the_three_specials():
  tokenizer = causal_lm.byte_tokenizer()
  text = "Define: café\n"
  ids = tokenizer.encode(text).ids
  assert ids[0] == 2  # <bos>
  # The GPT-2 byte alphabet sorted by character: map each UTF-8 byte through it independently.
  alphabet = sorted(causal_lm.pre_tokenizers.ByteLevel.alphabet())
  byte_to_char = {
      b: c
      for b, c in zip(
          [*range(33, 127), *range(161, 173), *range(174, 256)],
          map(chr, [*range(33, 127), *range(161, 173), *range(174, 256)]),
      )
  }
  byte_to_char.update({b: chr(256 + n) for n, b in enumerate(sorted(set(range(256)) - set(byte_to_char)))})
  assert ids[1:] == [3 + alphabet.index(byte_to_char[b]) for b in text.encode("utf-8")]
  assert tokenizer.decode(ids) == text


def test_encode_pairs_masks_only_the_response_and_its_end_token():
  tokenizer = causal_lm.byte_tokenizer()
  batch = causal_lm.encode_pairs(tokenizer, ["Define: a\n", "Q\n"], ["xy", "long answer"], max_len=14)
  prompt0, response0 = tokenizer.encode("Define: a\n").ids, tokenizer.encode("xy", add_special_tokens=False).ids
  expected0 = prompt0 + response0 + [1]
  np.testing.assert_array_equal(batch["input_ids"][0], expected0 + [0] * (14 - len(expected0)))
  np.testing.assert_array_equal(batch["attention_mask"][0], [1] * len(expected0) + [0] * (14 - len(expected0)))
  np.testing.assert_array_equal(
      batch["loss_mask"][0], [0] * len(prompt0) + [1] * (len(response0) + 1) + [0] * (14 - len(expected0))
  )
  # Too long: the response's end is cut (no eos), the mask still covers what is left of it.
  np.testing.assert_array_equal(batch["loss_mask"][1], [0, 0, 0] + [1] * 11)
  assert 1 not in batch["input_ids"][1]


def test_bad_inputs_are_clear_errors():
  tokenizer = causal_lm.byte_tokenizer()
  with pytest.raises(ValueError, match="max_len"):
    causal_lm.encode_pairs(tokenizer, ["a long prompt"], ["x"], max_len=4)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    causal_lm.load_tokenizer("/no/such/tokenizer")
  with pytest.raises(ValueError, match="max_len"):
    causal_lm.causal_lm_preprocess(None)
