"""Prompt tuning (configs/minilm_text.py) and VPT (configs/digits_vit.py) selected by name and run by the harness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import digits_vit, minilm_text
from jaxpeft.models.bert import BertConfig, BertEncoder
from jaxpeft.models.registry import build_model
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.trainable import Trainable

PROMPT = "adapter/embeddings/word_embeddings/embedding/prompt"
HIDDEN, CLASSES = 16, 6  # tiny_bert_dir's BERT and the config's head


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _vocabulary_rows(prompt, table):
  """For each prompt row, the indices of the embedding-table rows equal to it."""
  return [np.flatnonzero((np.asarray(table) == row).all(axis=1)) for row in np.asarray(prompt)]


def test_prompt_tuning_config_counts_p_d_plus_head_and_samples_vocabulary_rows():
  config = minilm_text.get_config("prompt_tuning:smoke")
  assert (config.adapter.method, config.adapter.init, config.trainable.base) == (
      "prompt_tuning",
      "sample_vocab",
      "classifier/.*",
  )
  vocab = 50
  model = BertEncoder(
      BertConfig(
          vocab_size=vocab,
          hidden_size=HIDDEN,
          num_hidden_layers=1,
          num_attention_heads=2,
          intermediate_size=32,
          max_position_embeddings=40,
      ),
      num_classes=CLASSES,
  )
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  trainable = Trainable.from_config(model, config)
  trained, _ = trainable.split(jax.random.key(1), params)
  p = config.adapter.rank
  assert p == 20 and trainable.num_trained(trained) == p * HIDDEN + HIDDEN * CLASSES + CLASSES
  rows = _vocabulary_rows(_flat(trained)[PROMPT], params["embeddings"]["word_embeddings"]["embedding"])
  assert all(r.size == 1 for r in rows) and len({int(r[0]) for r in rows}) > 10  # PEFT's SAMPLE_VOCAB


def test_prompt_tuning_smoke_run_trains_the_prompts_and_the_head(tiny_bert_dir, tiny_minilm_run):
  _, tensors = tiny_bert_dir
  config, result = tiny_minilm_run("prompt_tuning")
  p = config.adapter.rank
  assert result["step"] == 3 and 0.0 <= result["eval"]["accuracy"] <= 1.0
  assert result["trainable_params"] == p * HIDDEN + HIDDEN * CLASSES + CLASSES
  trained = _flat(result["state"].params)
  assert sorted(trained) == [PROMPT, "base/classifier/dense/bias", "base/classifier/dense/kernel"]
  assert trained[PROMPT].shape == (p, HIDDEN)
  # They started as rows of the checkpoint's word embeddings; three steps moved every one of them.
  rows = _vocabulary_rows(trained[PROMPT], tensors["embeddings.word_embeddings.weight"])
  assert all(r.size == 0 for r in rows)
  assert result["adapter_bytes"] > 0  # exported unmerged, in the adapter file


@pytest.mark.parametrize("method, prompted_blocks", [("vpt_shallow", 1), ("vpt_deep", 2)])
def test_vpt_configs_count_blocks_p_d_plus_head(method, prompted_blocks):
  config = digits_vit.get_config(f"{method}:smoke")
  config.model.depth = 2
  model = build_model(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  trainable = Trainable.from_config(model, config)
  trained, _ = trainable.split(jax.random.key(1), params)
  d, p = config.model.hidden, config.adapter.rank
  assert trainable.num_trained(trained) == prompted_blocks * p * d + d * 5 + 5
  assert {k.rsplit("/", 3)[0] for k in _flat(trained) if k.startswith("adapter/")} == {
      f"adapter/block_{i}" for i in range(prompted_blocks)
  }


def test_vpt_deep_smoke_run_on_the_digits_vit(data_dir, tmp_path):
  config = digits_vit.get_config("vpt_deep:smoke")
  config.dataset.data_dir = data_dir
  config.init_from.params = ""  # a random ViT: the wiring does not need the pretrain run
  config.model.depth = 2
  config.sharding.num_devices = 1
  result = train_and_evaluate(config, str(tmp_path))
  d, p = config.model.hidden, config.adapter.rank
  assert result["step"] == 4 and 0.0 <= result["eval"]["accuracy"] <= 1.0
  assert result["trainable_params"] == 2 * p * d + d * 5 + 5
  trained = _flat(result["state"].params)
  assert sorted(k for k in trained if k.startswith("base/")) == ["base/head/bias", "base/head/kernel"]
  assert {k: v.shape for k, v in trained.items() if k.startswith("adapter/")} == {
      f"adapter/block_{i}/ln_attention/scale/prompt": (p, d) for i in range(2)
  }
