r"""A short adapter run on the real Gemma 3 270M (GGUF Q4_K_M, dequantised) on WordNet definitions, on CPU.

  python -m experiments.llm --workdir=workdir/llm --steps=20

Trains `configs/gemma3_wordnet.py:<method>` with the harness (`jaxpeft.train.loop.train_and_evaluate`) for
`--steps` steps on very short sequences, and prints the held-out response loss, perplexity and next-token
accuracy on the first `--eval_examples` test examples, and greedy answers to `--samples` held-out prompts
(ROUGE-L and exact match against WordNet's gloss), before training (the base model: the adapter starts at
zero) and after. Writes `<workdir>/llm_results.json`. A small demonstration, not the full comparison of
issue 15's point 7.
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import gemma3_wordnet
from jaxpeft.data import input_pipeline
from jaxpeft.models.registry import build_model
from jaxpeft.train import causal_lm
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.pretrained import load_params

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (deleted first).")
_METHOD = flags.DEFINE_string("method", "lora", "A method of configs/gemma3_wordnet.py.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Training batch size.")
_MAX_LEN = flags.DEFINE_integer("max_len", 24, "Tokens per example (prompt + response + eos, truncated).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
_EVAL = flags.DEFINE_integer("eval_examples", 16, "Held-out examples for the loss.")
_SAMPLES = flags.DEFINE_integer("samples", 2, "Held-out prompts answered greedily.")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "Tokens generated per answer.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data dir ('' -> $JAXPEFT_DATA_DIR or" " ~/tensorflow_datasets)."
)
flags.mark_flags_as_required(["workdir"])


def _config():
  config = gemma3_wordnet.get_config(_METHOD.value)
  config.dataset.data_dir = _DATA_DIR.value
  config.dataset.max_len = _MAX_LEN.value
  config.dataset.eval_split = f"test[:{_EVAL.value}]"
  config.batch_size = _BATCH.value
  config.eval_batch_size = _EVAL.value
  config.num_train_steps = _STEPS.value
  config.log_every = 1
  config.optimizer.learning_rate = _LR.value
  config.optimizer.warmup_steps = min(2, _STEPS.value - 1)
  config.generation_examples = _SAMPLES.value
  config.generation_max_new_tokens = _NEW_TOKENS.value
  config.checkpoint.async_save = False
  return config


def _base_metrics(config) -> tuple[dict[str, float], list[dict[str, str]]]:
  """The base model's held-out metrics and answers (what the run starts from)."""
  model = build_model(config.model)
  source, _ = input_pipeline.get_data_source(
      config.dataset.name, config.dataset.eval_split, input_pipeline.resolve_data_dir(config.dataset.data_dir)
  )
  preprocess = input_pipeline.get_preprocess(config.dataset.name, config.dataset)
  example = jnp.zeros((1, config.dataset.max_len), jnp.int32)
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
  params = load_params(config.init_from.params, fresh)
  forward = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
  totals = None
  for batch in input_pipeline.eval_batches(source, batch_size=config.eval_batch_size, preprocess=preprocess):
    sums = causal_lm.eval_sums(forward(params, batch["input_ids"], batch["attention_mask"]), batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  metrics = causal_lm.finalize_eval(jax.device_get(totals))
  generation, samples = causal_lm.held_out_generation(
      model,
      params,
      source,
      config.dataset.tokenizer,
      count=config.generation_examples,
      max_new_tokens=config.generation_max_new_tokens,
  )
  return {**metrics, **generation}, samples


def main(argv):
  del argv
  config = _config()
  start = time.perf_counter()
  before, before_samples = _base_metrics(config)
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  result = train_and_evaluate(config, _WORKDIR.value)
  elapsed = time.perf_counter() - start
  tokens_per_sec = (result["steps_per_sec"] or float("nan")) * config.batch_size * config.dataset.max_len
  summary = {
      "method": _METHOD.value,
      "steps": _STEPS.value,
      "batch_size": config.batch_size,
      "max_len": config.dataset.max_len,
      "trainable_params": result["trainable_params"],
      "total_params": result["total_params"],
      "before": before,
      "after": result["eval"],
      "train_tokens_per_sec": tokens_per_sec,
      "wall_seconds": elapsed,
      "samples": [{**b, "response_after": a["response"]} for b, a in zip(before_samples, result["samples"])],
  }
  with open(os.path.join(_WORKDIR.value, "llm_results.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(
      f"{_METHOD.value}: {result['trainable_params']:,} trainable of {result['total_params']:,} params,"
      f" {_STEPS.value} steps of {config.batch_size} x {config.dataset.max_len} tokens"
      f" ({tokens_per_sec:.0f} train tokens/s), {elapsed:.0f} s in all"
  )
  for name in ("loss", "perplexity", "accuracy", "generation_rouge_l", "generation_exact_match"):
    print(f"  held-out {name:24s} before {before[name]:8.4f}   after {result['eval'][name]:8.4f}")
  for sample in summary["samples"]:
    print(
        f"  {sample['prompt'].strip()!r}\n    reference: {sample['reference']!r}\n"
        f"    before:    {sample['response']!r}\n    after:     {sample['response_after']!r}"
    )


if __name__ == "__main__":
  app.run(main)
