"""Running a list of runs and reporting them: command-line check, progress lines, markdown table, plot.

The tables and the plot take rows of `experiments.harness_runs.run_harness`. Shared by
experiments/flagship.py, vision_adapt.py, run.py, experiments/claims/ and benchmarks/adapters.py; it
defines no absl flags, so tests and several scripts can import it in one process.
"""

import os
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import matplotlib
from absl import app

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

Row = dict[str, Any]  # a row of `experiments.harness_runs.run_harness`
Result = TypeVar("Result")


def check_command_line(argv: Sequence[str], flag: str, values: Sequence[str], choices: Collection[str]) -> None:
  """Raises `app.UsageError` for positional arguments in `argv`, or `--flag` values not among `choices`."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [v for v in values if v not in choices]
  if unknown:
    raise app.UsageError(f"--{flag}: unknown {unknown}; choose from {list(choices)}.")


def run_each(
    jobs: Mapping[str, Callable[[], Result]], describe: Callable[[Result], str] | None = None
) -> tuple[list[Result], dict[str, float]]:
  """Runs `jobs` in order, with a progress line on stderr before and after each.

  The lines read '[i/n] name ...' and '[i/n] name: <describe(result)>, <seconds> s'.

  Returns:
    The jobs' results in order, and each job's wall-clock seconds by name.
  """
  results, seconds = [], {}
  for i, (name, job) in enumerate(jobs.items()):
    tag = f"[{i + 1}/{len(jobs)}] {name}"
    print(f"{tag} ...", file=sys.stderr, flush=True)
    start = time.time()
    results.append(job())
    seconds[name] = time.time() - start
    described = f"{describe(results[-1])}, " if describe else ""
    print(f"{tag}: {described}{seconds[name]:.0f} s", file=sys.stderr, flush=True)
  return results, seconds


def describe_row(row: Row) -> str:
  """A `run_harness` row in words: accuracy (and mean IoU), trainable parameters, steps per second."""
  iou = "" if row["mean_iou"] is None else f", mean IoU {row['mean_iou']:.3f}"
  return (
      f"accuracy {100 * row['accuracy']:.1f}%{iou}, {row['trainable_params']:,} trainable params,"
      f" {row['steps_per_second']:.2f} steps/s"
  )


def _trainable(row: Row) -> str:
  """'<trainable params> (<share of the model's parameters>)'."""
  return f"{row['trainable_params']:,} ({100 * row['trainable_params'] / row['total_params']:.2f}%)"


def _size(num_bytes: int | None) -> str:
  if num_bytes is None:
    return "—"
  return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.0f} kB"


# The cells of a results table of `run_harness` rows, by column header.
CELLS: dict[str, Callable[[Row], str]] = {
    "recipe": lambda r: r["recipe"],
    "method": lambda r: r["method"],
    "trainable params": _trainable,
    "adapter checkpoint": lambda r: _size(r["adapter_bytes"]),
    "held-out accuracy": lambda r: f"{100 * r['accuracy']:.1f}%",
    "mean IoU": lambda r: "—" if r["mean_iou"] is None else f"{r['mean_iou']:.3f}",
    "train steps/s": lambda r: f"{r['steps_per_second']:.2f}",
    "ms/step": lambda r: f"{1e3 / r['steps_per_second']:.0f}",
    "wall time": lambda r: f"{r['seconds']:.0f} s",
}
_LABEL_COLUMNS = ("recipe", "method")  # left-aligned; the other columns hold numbers


def markdown_table(
    rows: Sequence[Row], columns: Sequence[str], cells: Mapping[str, Callable[[Row], str]] = CELLS
) -> str:
  """A markdown table with a line per row and the given columns, each filled by `cells[column](row)`."""
  missing = [c for c in columns if c not in cells]
  if missing:
    raise ValueError(f"No cell for the columns {missing}; known columns: {list(cells)}. Pass `cells` with them.")
  align = ["---" if c in _LABEL_COLUMNS else "---:" for c in columns]
  lines = [f"| {' | '.join(columns)} |", f"|{'|'.join(align)}|"]
  lines += [f"| {' | '.join(cells[c](r) for c in columns)} |" for r in rows]
  return "\n".join(lines)


def accuracy_vs_params_figure(rows: Sequence[Row], title: str) -> plt.Figure:
  """Held-out accuracy against trainable parameters (log scale), one labelled point per row's method."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["trainable_params"], 100 * r["accuracy"])
    ax.annotate(
        r["method"],
        (r["trainable_params"], 100 * r["accuracy"]),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=8,
    )
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters")
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  return fig


def save_figure(fig: plt.Figure, path: str, dpi: int) -> None:
  """Saves `fig` as the PNG `path` at `dpi` (with a tight layout) and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def write_report(path: str, text: str) -> None:
  """Writes the markdown `text` to `path` (making its directory) and prints it and where it went."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"\n{text}\nWritten to {path}.", flush=True)
