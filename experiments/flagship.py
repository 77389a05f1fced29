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

import functools
import os

from absl import app, flags, logging

from configs import minilm_text
from experiments import report
from experiments.harness_runs import run_harness

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs, the table and the plot.")
# The flagship's comparison; the other methods of configs/minilm_text.py are compared by
# `python -m benchmarks.adapters --part=methods`.
FLAGSHIP_METHODS = ("linear_probe", "full", "lora", "lora_qkvo", "dora", "hydra", "salt")

_METHODS = flags.DEFINE_list("methods", list(FLAGSHIP_METHODS), "Methods of configs/minilm_text.py.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data dir ('' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets)."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "A Hugging Face BERT folder instead of the embedded all-MiniLM-L6-v2."
)
_SUFFIX = flags.DEFINE_string("config_arg_suffix", "", "Appended to each method's config argument, e.g. ':smoke'.")
flags.mark_flags_as_required(["workdir"])

COLUMNS = ("method", "trainable params", "adapter checkpoint", "held-out accuracy", "train steps/s", "wall time")
NOTES = (
    "Trainable params: share of the model's (encoder + head) parameters. Adapter checkpoint: the"
    " `export/adapter.safetensors` file (adapter leaves and their config record; the trained head,"
    " 9 kB, is in the merged export). Linear probe and full fine-tuning have no adapter; their"
    " trained weights are the head, and the whole model (the merged export), respectively.\n"
)


def markdown_table(rows: list[report.Row]) -> str:
  """The results table (one row per method)."""
  return report.markdown_table(rows, COLUMNS)


def plot(rows: list[report.Row], path: str) -> None:
  """Held-out accuracy against trainable parameters (log scale), one labelled point per method."""
  report.save_figure(report.accuracy_vs_params_figure(rows, "all-MiniLM-L6-v2 on jaxpeft_pydoc"), path, dpi=120)


def run_method(
    method: str, workdir: str, data_dir: str = "", suffix: str = "", checkpoint: str = ""
) -> report.Row:
  """Trains one method from scratch in `<workdir>/<method>`; returns its row of the table."""
  config = minilm_text.get_config(method + suffix)
  config.dataset.data_dir = data_dir
  if checkpoint:
    config.model.checkpoint = checkpoint  # also the tokenizer and init_from (one FieldReference)
  return run_harness(config, os.path.join(workdir, method), method)


def main(argv):
  report.check_command_line(argv, "methods", _METHODS.value, minilm_text.METHODS)
  logging.set_verbosity(logging.WARNING)  # the runs' progress bars and this script's lines suffice
  workdir = _WORKDIR.value
  jobs = {
      m: functools.partial(run_method, m, workdir, _DATA_DIR.value, _SUFFIX.value, _CHECKPOINT.value)
      for m in _METHODS.value
  }
  rows, seconds = report.run_each(jobs, report.describe_row)
  report.write_report(
      os.path.join(workdir, "results.md"),
      markdown_table(rows) + "\n\n" + NOTES + f"\nTotal wall time: {sum(seconds.values()):.0f} s.\n",
  )
  plot(rows, os.path.join(workdir, "accuracy_vs_params.png"))


if __name__ == "__main__":
  app.run(main)
