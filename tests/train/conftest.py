"""Fixtures for the harness tests: one prepared data dir per session, a tiny random BERT folder."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from configs import minilm_text, quickstart
from jaxpeft.models import hf_loader
from jaxpeft.models.bert import BertConfig, BertEncoder
from jaxpeft.train.loop import train_and_evaluate


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def smoke_config(data_dir):
  """The quickstart smoke config (6 steps, checkpoint every 3), pointed at the test data dir."""

  def make(**overrides):
    config = quickstart.get_config("smoke")
    config.dataset.data_dir = data_dir
    config.log_every = 1
    for dotted, value in overrides.items():
      node = config
      *parents, leaf = dotted.split("__")
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config

  return make


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
  """A Hugging Face-format BERT folder: random weights of a 2-layer, hidden-16 BERT, the real tokenizer."""
  folder = tmp_path_factory.mktemp("tiny_bert")
  hf_config = {
      "model_type": "bert",
      "vocab_size": 30522,
      "hidden_size": 16,
      "num_hidden_layers": 2,
      "num_attention_heads": 2,
      "intermediate_size": 32,
      "max_position_embeddings": 64,
      "type_vocab_size": 2,
      "hidden_act": "gelu",
  }
  (folder / "config.json").write_text(json.dumps(hf_config))
  model = BertEncoder(BertConfig.from_dict(hf_config))
  params = model.init(jax.random.key(7), jnp.zeros((1, 4), jnp.int32))["params"]
  tensors = {
      hf_loader.hf_name(path): np.asarray(v.T if path.endswith("/kernel") else v)  # torch Linear: (out, in)
      for path, v in traverse_util.flatten_dict(params, sep="/").items()
  }
  safetensors.numpy.save_file(tensors, folder / "model.safetensors")
  shutil.copy(hf_loader.resolve_model_dir(None) / "tokenizer.json", folder / "tokenizer.json")
  return folder, tensors


@pytest.fixture
def tiny_minilm_run(tiny_bert_dir, data_dir, tmp_path):
  """`run(method)`: configs/minilm_text.py's '<method>:smoke' on the tiny BERT folder -> (config, result)."""

  def run(method):
    config = minilm_text.get_config(f"{method}:smoke")
    config.model.checkpoint = str(tiny_bert_dir[0])
    config.dataset.data_dir = data_dir
    config.sharding.num_devices = 1
    return config, train_and_evaluate(config, str(tmp_path))

  return run
