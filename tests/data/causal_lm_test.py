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


def test_packed_batch_has_the_loss_of_the_examples_padded_separately():
  import jax
  import jax.numpy as jnp

  from configs import gemma3_wordnet
  from jaxpeft.models import gemma3
  from jaxpeft.train import causal_lm as objective

  tokenizer = causal_lm.byte_tokenizer()
  prompts = ["Define: a\n", "Q\n", "Define: cat\n", "x\n", "Define: run\n", "y\n"]
  responses = ["first", "a longer answer", "feline", "z", "to move fast", "ok"]
  padded = causal_lm.encode_pairs(tokenizer, prompts, responses, max_len=32)
  packed = causal_lm.encode_pairs(tokenizer, prompts, responses, max_len=64, per_row=3)
  assert packed["input_ids"].shape == (2, 64) and packed["segment_ids"].max() == 3
  assert packed["loss_mask"].sum() == padded["loss_mask"].sum()  # every response token is there once
  np.testing.assert_array_equal(padded["positions"][0, :5], range(5))

  model = gemma3.Gemma3(gemma3.Gemma3Config(**gemma3_wordnet.TINY_ARCHITECTURE))  # sliding window 8
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  loss = lambda b, *extra: float(
      objective.loss(model.apply(params, b["input_ids"], b["attention_mask"], *extra), b)
  )
  separate = loss(padded)  # one example per row, the model's default positions and mask
  np.testing.assert_allclose(loss(packed, packed["positions"], packed["segment_ids"]), separate, rtol=1e-5)
  # Without the segment mask the packed examples see each other, and the loss changes.
  assert abs(loss(packed, packed["positions"]) - separate) > 1e-3


def test_packing_cuts_an_example_that_fits_no_row_and_checks_the_batch_size():
  tokenizer = causal_lm.byte_tokenizer()
  batch = causal_lm.encode_pairs(tokenizer, ["Q\n", "R\n"], ["a" * 10, "b" * 10], max_len=20, per_row=2)
  # The first example takes 14 tokens; the second (14) is cut to the 6 left: its prompt (3) and 3 response tokens.
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 14 + [2] * 6)
  np.testing.assert_array_equal(batch["positions"][0, 14:], range(6))
  assert batch["loss_mask"][0, 14:].tolist() == [0, 0, 0, 1, 1, 1]
  config = causal_lm.ml_collections.ConfigDict({"tokenizer": "bytes", "max_len": 20, "packing": 2})
  with pytest.raises(ValueError, match="must divide the batch of 3"):
    causal_lm.causal_lm_preprocess(config)({"prompt": np.array(["a", "b", "c"]), "response": np.array(["x"] * 3)})
