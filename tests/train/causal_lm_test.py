"""Tests of jaxpeft.train.causal_lm: the response-only next-token loss, eval sums and ROUGE-L."""

import jax
import numpy as np
import pytest

from jaxpeft.train import causal_lm
from jaxpeft.train.step import objective


def _batch(rng):
  ids = rng.integers(0, 11, (3, 6)).astype(np.int32)
  loss_mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], np.int32)
  return {
      "input_ids": ids,
      "attention_mask": np.ones_like(ids),
      "loss_mask": loss_mask,
      "mask": np.array([True, True, False]),
  }


def _numpy_loss_terms(logits, batch, rows):
  """Loops over (row, position): -log softmax(logits[b, t])[ids[b, t + 1]] where loss_mask[b, t + 1]."""
  terms = []
  for b in rows:
    for t in range(logits.shape[1] - 1):
      if batch["loss_mask"][b, t + 1]:
        z = logits[b, t].astype(np.float64)
        terms.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[batch["input_ids"][b, t + 1]])
  return terms


def test_loss_is_the_mean_cross_entropy_over_response_tokens():
  rng = np.random.default_rng(0)
  logits, batch = rng.normal(size=(3, 6, 11)).astype(np.float32), _batch(rng)
  np.testing.assert_allclose(
      causal_lm.loss(logits, batch), np.mean(_numpy_loss_terms(logits, batch, range(3))), rtol=1e-5
  )
  assert objective("causal_lm").loss is causal_lm.loss


def test_prompt_targets_do_not_change_the_loss_and_response_targets_do():
  rng = np.random.default_rng(1)
  logits, batch = rng.normal(size=(3, 6, 11)).astype(np.float32), _batch(rng)
  changed_prompt = {
      **batch,
      "input_ids": np.where(batch["loss_mask"] == 0, (batch["input_ids"] + 3) % 11, batch["input_ids"]),
  }
  np.testing.assert_allclose(causal_lm.loss(logits, changed_prompt), causal_lm.loss(logits, batch), rtol=1e-6)
  changed_response = {
      **batch,
      "input_ids": np.where(batch["loss_mask"] == 1, (batch["input_ids"] + 3) % 11, batch["input_ids"]),
  }
  assert abs(float(causal_lm.loss(logits, changed_response)) - float(causal_lm.loss(logits, batch))) > 1e-3


def test_eval_sums_skip_padding_rows_and_give_perplexity():
  rng = np.random.default_rng(2)
  logits, batch = rng.normal(size=(3, 6, 11)).astype(np.float32), _batch(rng)
  sums = jax.device_get(causal_lm.eval_sums(logits, batch))
  terms = _numpy_loss_terms(logits, batch, rows=(0, 1))  # row 2 is a padding row of the split
  assert sums["count"] == len(terms) == 8
  np.testing.assert_allclose(sums["loss"], np.sum(terms), rtol=1e-5)
  metrics = causal_lm.finalize_eval(sums)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(np.mean(terms)), rtol=1e-5)
  with pytest.raises(ValueError, match="max_len"):
    causal_lm.finalize_eval({"loss": 0.0, "correct": 0.0, "count": 0.0})


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
  # LCS of 'the cat sat on the mat' and 'the cat is on the mat' is 'the cat on the mat' (5 of 6 words each).
  assert causal_lm.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
  # LCS 'a c' (2): precision 2/3, recall 2/4, F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7.
  assert causal_lm.rouge_l("a b c", "a c d e") == pytest.approx(4 / 7)
  assert causal_lm.rouge_l("x", "y") == 0.0
  assert causal_lm.rouge_l("", "") == 1.0


def test_unknown_task_is_a_clear_error():
  with pytest.raises(ValueError, match="config.task"):
    objective("regression")
