"""Prompt tuning through module hooks, against the numpy forward pass of the tiny transformer."""

import jax
import numpy as np
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import module_hook_checks as mh

P = 3
TEXT = AdapterConfig(targets="embed/embedding", method="prompt_tuning", rank=P)


def test_prompt_tuning_equals_numpy_forward():
  model, x, params = mh.model_and_input(text=True)
  adapter = reparam.init(jax.random.key(1), TEXT, params)
  prompt = mh.prompt_at(adapter, "embed/embedding")
  expect = mh.np_forward(
      params,
      x,
      embed_out=lambda e: np.concatenate([np.broadcast_to(prompt, e.shape[:-2] + prompt.shape), e], axis=-2),
  )
  assert not np.allclose(expect, mh.np_forward(params, x), atol=1e-2)
  np.testing.assert_allclose(mh.hooked_apply(model, params, adapter, TEXT, x), expect, rtol=1e-5, atol=1e-5)
  assert sum(v.size for v in jax.tree.leaves(adapter)) == P * mh.D


def test_prompt_tuning_inits_match_peft():
  from peft import PromptTuningConfig, PromptTuningInit, TaskType
  from peft.tuners.prompt_tuning import PromptEmbedding

  n, d = 400, 32
  table = {"embed": {"embedding": jax.random.normal(jax.random.key(0), (50, d))}}
  ours = mh.prompt_at(
      reparam.init(
          jax.random.key(1), AdapterConfig(targets="embed/embedding", method="prompt_tuning", rank=n), table
      ),
      "embed/embedding",
  )
  torch.manual_seed(0)
  peft_config = PromptTuningConfig(
      task_type=TaskType.CAUSAL_LM,
      num_virtual_tokens=n,
      token_dim=d,
      num_transformer_submodules=1,
      prompt_tuning_init=PromptTuningInit.RANDOM,
  )
  theirs = PromptEmbedding(peft_config, torch.nn.Embedding(50, d)).embedding.weight.detach().numpy()
  assert ours.shape == theirs.shape
  # both N(0, 1): 12800 draws each, tolerances about 5 standard errors of the difference
  np.testing.assert_allclose(ours.mean(), theirs.mean(), atol=0.06)
  np.testing.assert_allclose(ours.std(), theirs.std(), atol=0.045)
  np.testing.assert_allclose(ours.std(), 1.0, atol=0.03)
  sampled = mh.prompt_at(
      reparam.init(
          jax.random.key(1),
          AdapterConfig(targets="embed/embedding", method="prompt_tuning", rank=n, init="sample_vocab"),
          table,
      ),
      "embed/embedding",
  )
  vocab = np.asarray(table["embed"]["embedding"], np.float64)
  rows = [np.flatnonzero(np.all(np.isclose(vocab, row), axis=1)) for row in sampled]
  assert all(r.size == 1 for r in rows) and len({int(r[0]) for r in rows}) > 40  # real rows, many of them


def test_training_and_checkpoint(tmp_path):
  model, x, params = mh.model_and_input(text=True)
  mh.check_training_reduces_loss(model, x, params, TEXT, lr=1e-1)
  mh.check_checkpoint_round_trip(tmp_path, model, x, params, reparam.init(jax.random.key(1), TEXT, params), TEXT)


def test_errors():
  _, _, params = mh.model_and_input(text=True)
  with pytest.raises(ValueError, match="targets the 'embedding' table"):
    reparam.init(jax.random.key(0), AdapterConfig(targets="head/kernel", method="prompt_tuning"), params)
  with pytest.raises(ValueError, match="unknown init 'text'"):
    reparam.init(
        jax.random.key(0), AdapterConfig(targets="embed/embedding", method="prompt_tuning", init="text"), params
    )
