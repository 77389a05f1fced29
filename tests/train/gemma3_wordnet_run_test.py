"""End to end: configs/gemma3_wordnet.py:<method>:smoke through the harness on a tiny random Gemma 3."""

import json
import os

import numpy as np
import pytest

from configs import gemma3_wordnet
from jaxpeft.train.loop import train_and_evaluate


@pytest.mark.parametrize("method,remat,packing", [("lora", False, 2), ("dora", True, 0), ("lora:nf4", False, 0)])
def test_smoke_run_lowers_the_response_loss_and_reports_lm_metrics(method, remat, packing, data_dir, tmp_path):
  config = gemma3_wordnet.get_config(f"{method}:smoke")
  config.dataset.data_dir = data_dir
  config.model.remat = remat
  config.dataset.packing = packing  # 2 examples per training row; evaluation stays one per row
  config.dataset.max_len *= max(packing, 1)
  config.batch_size *= max(packing, 1)  # the packed rows (batch_size / packing) must divide over the 8 devices
  result = train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    train = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
  assert len(train) == config.num_train_steps
  assert train[-1] < train[0] - 0.05
  # Only the adapter trains: a rank-8 pair per projection (7 per layer, 2 layers); DoRA adds a magnitude.
  arch = gemma3_wordnet.TINY_ARCHITECTURE
  heads, kv, head_dim = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
  shapes = [
      (arch["hidden_size"], heads * head_dim),
      (arch["hidden_size"], kv * head_dim),
      (arch["hidden_size"], kv * head_dim),
      (heads * head_dim, arch["hidden_size"]),
      (arch["hidden_size"], arch["intermediate_size"]),
      (arch["hidden_size"], arch["intermediate_size"]),
      (arch["intermediate_size"], arch["hidden_size"]),
  ]
  lora = sum(8 * (fan_in + fan_out) for fan_in, fan_out in shapes)
  magnitudes = sum(fan_out for _, fan_out in shapes) if method == "dora" else 0
  if method.endswith(":nf4"):  # the 14 frozen projection kernels are stored as NF4 codes
    assert result["frozen_memory_bytes_per_param"] < 4.0
  assert result["trainable_params"] == arch["num_hidden_layers"] * (lora + magnitudes)
  metrics = result["eval"]
  assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))
  assert metrics["loss"] < np.log(arch["vocab_size"])  # better than uniform over the vocabulary
  assert 0.0 <= metrics["generation_rouge_l"] <= 1.0 and 0.0 <= metrics["generation_exact_match"] <= 1.0
  assert len(result["samples"]) == config.generation_examples
  assert all(s["prompt"].startswith("Define: ") for s in result["samples"])
