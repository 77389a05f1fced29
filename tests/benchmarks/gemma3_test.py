"""Smoke tests of `benchmarks/gemma3.py` on a tiny random Gemma 3: `--part=train_step` runs the same LoRA step in
both frameworks, `--part=quantized_base` on float32, bf16 and NF4 bases (first losses = the cross-entropy
recomputed in numpy on each base), and every step is timed."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gemma3 as benchmark
from configs import gemma3_wordnet
from jaxpeft import quantize
from jaxpeft.models import gemma3


def _cross_entropy(config, params, ids):
  """Mean next-token cross-entropy of the model on `ids`, the softmax in float64 numpy."""
  logits = np.asarray(gemma3.Gemma3(config).apply({"params": params}, jnp.asarray(ids)), np.float64)[:, :-1]
  top = logits.max(-1, keepdims=True)
  log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, ids[:, 1:, None], -1).mean()


def _tiny_model_and_ids():
  """The benchmark's `--tiny` model (config, params) and its `--batch=2 --length=16` token ids."""
  config = gemma3.Gemma3Config(**gemma3_wordnet.TINY_ARCHITECTURE)
  params = jax.jit(gemma3.Gemma3(config).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return config, params, np.random.default_rng(0).integers(3, config.vocab_size, (2, 16))


def test_train_step_compares_the_same_lora_step(capsys):
  args = benchmark.parse_args(["--part=train_step", "--tiny", "--batch=2", "--length=16", "--rounds=3"])
  result = benchmark.train_step(args)

  config, params, ids = _tiny_model_and_ids()
  expected = _cross_entropy(config, params, ids)
  np.testing.assert_allclose(result["loss"], [expected, expected], rtol=1e-4)
  assert all(len(times) == 3 and min(times) > 0 for times in result["seconds"])
  assert "ratio jaxpeft / transformers + PEFT" in capsys.readouterr().out


def test_quantized_base_steps_start_from_each_bases_loss(capsys):
  args = benchmark.parse_args(["--part=quantized_base", "--tiny", "--batch=2", "--length=16", "--rounds=3"])
  result = benchmark.quantized_base(args)

  config, params, ids = _tiny_model_and_ids()
  nf4 = quantize.dequantize_tree(quantize.quantize_tree(params, gemma3_wordnet.PROJECTIONS, "nf4", 64, True))
  np.testing.assert_allclose(result["losses"][0], _cross_entropy(config, params, ids), rtol=1e-4)
  np.testing.assert_allclose(result["losses"][1], _cross_entropy(config, params, ids), rtol=2e-2)
  np.testing.assert_allclose(result["losses"][2], _cross_entropy(config, nf4, ids), rtol=1e-4)
  assert all(len(times) == 3 and min(times) > 0 for times in result["seconds"])
  assert "| NF4 + double quant | " in capsys.readouterr().out
