"""Smoke test of `benchmarks/gemma3.py --part=train_step` on a tiny random Gemma 3: both frameworks run
the same LoRA step (same first loss, the base model's cross-entropy recomputed in numpy) and are timed."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gemma3 as benchmark
from configs import gemma3_wordnet
from jaxpeft.models import gemma3


def test_train_step_compares_the_same_lora_step(capsys):
  args = benchmark.parse_args(["--part=train_step", "--tiny", "--batch=2", "--length=16", "--rounds=3"])
  result = benchmark.train_step(args)

  config = gemma3.Gemma3Config(**gemma3_wordnet.TINY_ARCHITECTURE)
  params = jax.jit(gemma3.Gemma3(config).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 16))
  logits = np.asarray(gemma3.Gemma3(config).apply({"params": params}, jnp.asarray(ids)), np.float64)[:, :-1]
  top = logits.max(-1, keepdims=True)
  log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs, ids[:, 1:, None], -1).mean()
  np.testing.assert_allclose(result["loss"], [expected, expected], rtol=1e-4)
  assert all(len(times) == 3 and min(times) > 0 for times in result["seconds"])
  assert "ratio jaxpeft / transformers + PEFT" in capsys.readouterr().out
