r"""Adapter methods on the real Gemma 3 270M (GGUF Q4_K_M, dequantised) on WordNet definitions, on CPU.

  python -m experiments.llm --workdir=workdir/llm --methods=lora,dora,sora,lora:nf4 --steps=16

Computes the base model's held-out metrics once (every method's adapter starts at zero, so this is where
each run starts), then trains `configs/gemma3_wordnet.py:<method>` with the harness
(`jaxpeft.train.loop.train_and_evaluate`) for `--steps` steps on very short sequences, each method (`<method>:nf4`: the same on an NF4 base, QLoRA) in its
own process (`--child`, so its peak resident memory is its own; a rerun on the same `--workdir` reuses the
results already there). Reported per method: trainable
parameters, the held-out response loss, perplexity and next-token accuracy on the first `--eval_examples`
test examples, ROUGE-L and exact match of greedy answers to `--samples` held-out prompts (against WordNet's
gloss; generation runs on the merged weights), training tokens/s (padded `batch x max_len` tokens per
step, after compilation) and peak resident memory of the process. Writes `<workdir>/<method>/` (the run and
its `llm_results.json`) and, in `--results_dir`, `llm.md` (table and sample answers before/after) and
`llm_loss.png` (training loss per step).
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import gemma3_wordnet
from experiments import report
from jaxpeft.data import input_pipeline
from jaxpeft.models.registry import build_model
from jaxpeft.train import causal_lm
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.pretrained import load_params

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs (each method's deleted first).")
_METHODS = flags.DEFINE_list("methods", ["lora", "dora", "sora"], "Methods of configs/gemma3_wordnet.py.")
_RESULTS = flags.DEFINE_string("results_dir", "experiments/results", "Where llm.md and llm_loss.png go.")
_CHILD = flags.DEFINE_enum(
    "child", "", ["", "base", "train"], "Internal: evaluate the base / train the one method of --methods here."
)
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


_PASSED = (
    "steps",
    "batch_size",
    "max_len",
    "learning_rate",
    "eval_examples",
    "samples",
    "max_new_tokens",
    "data_dir",
)


def _config(method: str):
  config = gemma3_wordnet.get_config(method)
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


def _peak_memory_mb() -> float:
  """Peak resident memory of this process in MB (Linux reports ru_maxrss in kB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_one(method: str, workdir: str) -> None:
  """Trains `method` (in this process) and writes `<workdir>/llm_results.json`."""
  config = _config(method)
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.perf_counter()
  result = train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    losses = [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]
  summary = {
      "method": method,
      "trainable_params": result["trainable_params"],
      "total_params": result["total_params"],
      "after": result["eval"],
      "train_tokens_per_sec": (result["steps_per_sec"] or float("nan"))
      * config.batch_size
      * config.dataset.max_len,
      "peak_memory_mb": _peak_memory_mb(),
      "train_seconds": time.perf_counter() - start,
      "train_losses": losses,
      "responses_after": [s["response"] for s in result["samples"]],
  }
  with open(os.path.join(workdir, "llm_results.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)


def _loss_figure(rows):
  fig, ax = report.plt.subplots(figsize=(6, 4))
  for row in rows:
    steps, losses = zip(*row["train_losses"])
    ax.plot(steps, losses, marker="o", markersize=3, label=row["method"])
  ax.set_xlabel("step")
  ax.set_ylabel("training response loss (batch)")
  ax.set_title("Gemma 3 270M on WordNet definitions", fontsize=10)
  ax.legend()
  ax.grid(True, alpha=0.3)
  return fig


_COLUMNS = {
    "method": lambda r: r["method"],
    "trainable params": lambda r: f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f}%)",
    "held-out loss": lambda r: f"{r['after']['loss']:.3f}",
    "perplexity": lambda r: f"{r['after']['perplexity']:.1f}",
    "next-token acc.": lambda r: f"{r['after']['accuracy']:.3f}",
    "ROUGE-L": lambda r: f"{r['after']['generation_rouge_l']:.3f}",
    "exact match": lambda r: f"{r['after']['generation_exact_match']:.2f}",
    "train tokens/s": lambda r: f"{r['train_tokens_per_sec']:.0f}",
    "peak memory": lambda r: f"{r['peak_memory_mb'] / 1024:.1f} GB",
    "train wall time": lambda r: f"{r['train_seconds']:.0f} s",
}


def _report(base_results, rows) -> str:
  before, samples = base_results["before"], base_results["samples"]
  base = {
      "method": "base (before)",
      "trainable_params": 0,
      "total_params": rows[0]["total_params"],
      "after": before,
      "train_tokens_per_sec": float("nan"),
      "peak_memory_mb": base_results["peak_memory_mb"],
      "train_seconds": 0.0,
  }
  cells = {**_COLUMNS, "train tokens/s": lambda r: "—" if r is base else _COLUMNS["train tokens/s"](r)}
  cells["train wall time"] = lambda r: "—" if r is base else _COLUMNS["train wall time"](r)
  lines = [
      "# Gemma 3 270M (GGUF Q4_K_M, dequantised to float32) on WordNet definitions",
      "",
      f"`python -m experiments.llm {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
      f" {os.cpu_count()} CPU cores, load average at the end {os.getloadavg()[0]:.1f} (shared machine),"
      f" {_STEPS.value} steps of {_BATCH.value} examples x {_MAX_LEN.value} tokens, learning"
      f" rate {_LR.value}; held-out: the first {_EVAL.value} test words (loss on response tokens), greedy answers to"
      f" the first {_SAMPLES.value} ({_NEW_TOKENS.value} new tokens at most). Every adapter targets q/k/v/o and"
      " gate/up/down of all 18 layers, rank 8. Peak memory: the process's peak resident set (the base row: the"
      " process that evaluated the base model). A `:nf4` row starts from the NF4-quantized base, not from the"
      " base row's float weights.",
      "",
      report.markdown_table([base, *rows], list(cells), cells),
      "",
      "![training loss](llm_loss.png)",
      "",
      "## Sample answers (greedy)",
      "",
  ]
  for i, sample in enumerate(samples):
    quoted = lambda text: json.dumps(text, ensure_ascii=False)  # one line, newlines as \n
    lines += [f"`{sample['prompt'].strip()}` (WordNet: {quoted(sample['reference'])})", ""]
    lines += [f"* base: {quoted(sample['response'])}"]
    lines += [f"* {r['method']}: {quoted(r['responses_after'][i])}" for r in rows]
    lines.append("")
  return "\n".join(lines)


def _base_one(method: str, workdir: str) -> None:
  """Writes the base model's held-out metrics and answers to `<workdir>/llm_results.json`."""
  before, samples = _base_metrics(_config(method))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "llm_results.json"), "w", encoding="utf-8") as f:
    json.dump({"before": before, "samples": samples, "peak_memory_mb": _peak_memory_mb()}, f, indent=2)


def main(argv):
  report.check_command_line(
      argv, "methods", _METHODS.value, [m + v for m in gemma3_wordnet.METHODS for v in ("", ":nf4")]
  )
  if _CHILD.value:
    (_base_one if _CHILD.value == "base" else _train_one)(_METHODS.value[0], _WORKDIR.value)
    return
  passed = [f"--{name}={getattr(flags.FLAGS, name)}" for name in _PASSED]

  def job(kind, method):
    """The results of one child process (reused when an earlier run of the same workdir wrote them)."""
    workdir = os.path.join(_WORKDIR.value, "base" if kind == "base" else method.replace(":", "_"))
    results = os.path.join(workdir, "llm_results.json")
    if not os.path.exists(results):
      command = [sys.executable, "-m", "experiments.llm", f"--child={kind}", f"--methods={method}"]
      subprocess.run(command + [f"--workdir={workdir}"] + passed, check=True)
    with open(results, encoding="utf-8") as f:
      return json.load(f)

  base = job("base", _METHODS.value[0])
  describe = lambda r: f"held-out loss {base['before']['loss']:.3f} -> {r['after']['loss']:.3f}"
  rows, _ = report.run_each({m: lambda m=m: job("train", m) for m in _METHODS.value}, describe)
  os.makedirs(_RESULTS.value, exist_ok=True)
  report.save_figure(_loss_figure(rows), os.path.join(_RESULTS.value, "llm_loss.png"), dpi=100)
  text = _report(base, rows)
  report.write_report(os.path.join(_RESULTS.value, "llm.md"), text)


if __name__ == "__main__":
  app.run(main)
