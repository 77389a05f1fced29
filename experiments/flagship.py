r"""The flagship experiment: MiniLM on docstring topics with seven fine-tuning methods, on CPU.

  python -m experiments.flagship --workdir=workdir/flagship

Each method of `FLAGSHIP_METHODS` (linear probe, full fine-tuning, LoRA, LoRA on q/k/v/o, DoRA,
Hydra, SALT) is trained in turn by the harness (`jaxpeft.train.loop.train_and_evaluate`) in
`<workdir>/<method>/` (a fresh run: an earlier run of the method there is deleted first). Then
it writes

* `<workdir>/results.md`: method, trainable parameters, adapter checkpoint size, held-out
  accuracy, training steps per second;
* `<workdir>/accuracy_vs_params.png`: held-out accuracy against trainable parameters.

Steps per second are the harness's own measurement (the median over its log intervals after
the first), so they exclude compilation, loading, evaluation and export.
`--methods=lora,full` runs a subset; `--config_arg_suffix=:smoke` runs the smoke variants;
`--checkpoint=DIR` uses another Hugging Face BERT folder.
"""

import os
import time
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging  # pylint: disable=wrong-import-position

from configs import minilm_text  # pylint: disable=wrong-import-position
from experiments.harness_runs import run_harness  # pylint: disable=wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs, the table and the plot.")
# The flagship's comparison; the other methods of configs/minilm_text.py are compared by
# `python -m benchmarks.adapters --part=methods`.
FLAGSHIP_METHODS = ("linear_probe", "full", "lora", "lora_qkvo", "dora", "hydra", "salt")

_METHODS = flags.DEFINE_list("methods", list(FLAGSHIP_METHODS), "Methods of configs/minilm_text.py.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "A Hugging Face BERT folder instead of the embedded all-MiniLM-L6-v2.")
_SUFFIX = flags.DEFINE_string("config_arg_suffix", "", "Appended to each method's config argument, e.g. ':smoke'.")
flags.mark_flags_as_required(["workdir"])


def _size(num_bytes: int | None) -> str:
  if num_bytes is None:
    return "—"
  return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.0f} kB"


NOTES = (
    "Trainable params: share of the model's (encoder + head) parameters. Adapter checkpoint: the"
    " `export/adapter.safetensors` file (adapter leaves and their config record; the trained head,"
    " 9 kB, is in the merged export). Linear probe and full fine-tuning have no adapter; their"
    " trained weights are the head, and the whole model (the merged export), respectively.\n"
)


def trainable_cell(row: dict) -> str:
  """'<trainable params> (<share of the model's parameters>)' for a row of `run_method`."""
  return f"{row['trainable_params']:,} ({100 * row['trainable_params'] / row['total_params']:.2f}%)"


def markdown_table(rows: Sequence[dict]) -> str:
  """The results table (one row per method)."""
  lines = [
      "| method | trainable params | adapter checkpoint | held-out accuracy | train steps/s | wall time |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r['method']} | {trainable_cell(r)} | {_size(r.get('adapter_bytes'))} |"
        f" {100 * r['accuracy']:.1f}% | {r['steps_per_second']:.2f} | {r['seconds']:.0f} s |"
    )
  return "\n".join(lines)


def plot(rows: Sequence[dict], path: str) -> None:
  """Held-out accuracy against trainable parameters (log scale), one labelled point per method."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["trainable_params"], 100 * r["accuracy"])
    ax.annotate(r["method"], (r["trainable_params"], 100 * r["accuracy"]), textcoords="offset points",
                xytext=(5, 5))
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters")
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_title("all-MiniLM-L6-v2 on jaxpeft_pydoc")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_method(method: str, workdir: str, data_dir: str = "", suffix: str = "", checkpoint: str = "") -> dict:
  """Trains one method from scratch in `<workdir>/<method>`; returns its row of the table."""
  config = minilm_text.get_config(method + suffix)
  config.dataset.data_dir = data_dir
  if checkpoint:
    config.model.checkpoint = checkpoint  # also the tokenizer and init_from (one FieldReference)
  return run_harness(config, os.path.join(workdir, method), method)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [m for m in _METHODS.value if m not in minilm_text.METHODS]
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; choose from {list(minilm_text.METHODS)}.")
  logging.set_verbosity(logging.WARNING)  # the runs' progress bars and this script's lines suffice
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  rows, start = [], time.time()
  for i, method in enumerate(_METHODS.value):
    print(f"[{i + 1}/{len(_METHODS.value)}] {method} ...", flush=True)
    rows.append(run_method(method, workdir, _DATA_DIR.value, _SUFFIX.value, _CHECKPOINT.value))
    r = rows[-1]
    print(f"[{i + 1}/{len(_METHODS.value)}] {method}: accuracy {100 * r['accuracy']:.1f}%,"
          f" {r['trainable_params']:,} trainable params, {r['steps_per_second']:.2f} steps/s,"
          f" {r['seconds']:.0f} s", flush=True)
  table = markdown_table(rows)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n\n" + NOTES + f"\nTotal wall time: {time.time() - start:.0f} s.\n")
  plot(rows, os.path.join(workdir, "accuracy_vs_params.png"))
  print("\n" + table + f"\n\nTotal wall time {time.time() - start:.0f} s; results.md and"
        f" accuracy_vs_params.png are in {workdir}.", flush=True)


if __name__ == "__main__":
  app.run(main)
