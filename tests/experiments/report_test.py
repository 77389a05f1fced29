"""Tests of experiments/report.py: command-line check, progress lines, tables, plot, results file."""

import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
from absl import app

from benchmarks.adapters import methods_table
from experiments import report


def _row(method: str, trainable: int, accuracy: float, steps_per_second: float, mean_iou=None) -> report.Row:
  """A row shaped like `experiments.harness_runs.run_harness`'s."""
  return {
      "method": method,
      "trainable_params": trainable,
      "total_params": 22_700_000,
      "adapter_bytes": None,
      "params_bytes": None,
      "accuracy": accuracy,
      "mean_iou": mean_iou,
      "steps_per_second": steps_per_second,
      "seconds": 12.4,
  }


ROWS = [_row("lora", 147_456, 0.912, 3.25), _row("full", 22_700_000, 0.934, 1.5)]


def _cells(table: str) -> list[list[str]]:
  """The body cells of a markdown table (header and alignment lines dropped)."""
  return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_check_command_line_names_what_is_wrong():
  report.check_command_line(["prog"], "methods", ["lora"], {"lora": 1, "full": 2})
  with pytest.raises(app.UsageError, match=r"Unexpected arguments: \['extra'\]"):
    report.check_command_line(["prog", "extra"], "methods", ["lora"], ["lora"])
  with pytest.raises(app.UsageError, match=r"--methods: unknown \['lorra'\]; choose from \['lora', 'full'\]"):
    report.check_command_line(["prog"], "methods", ["lora", "lorra"], {"lora": 1, "full": 2})


def test_run_each_runs_in_order_and_prints_a_line_before_and_after_each(capsys):
  calls = []
  jobs = {name: (lambda name=name: calls.append(name) or name.upper()) for name in ("a", "b", "c")}
  results, seconds = report.run_each(jobs, describe=lambda r: f"got {r}")
  assert calls == ["a", "b", "c"] and results == ["A", "B", "C"]
  assert list(seconds) == ["a", "b", "c"] and all(s >= 0 for s in seconds.values())
  lines = capsys.readouterr().err.splitlines()
  assert lines[:2] == ["[1/3] a ...", "[1/3] a: got A, 0 s"]
  assert len(lines) == 6 and lines[-1].startswith("[3/3] c: got C, ")


def test_describe_row_names_the_mean_iou_only_when_there_is_one():
  assert report.describe_row(ROWS[0]) == "accuracy 91.2%, 147,456 trainable params, 3.25 steps/s"
  assert "mean IoU 0.457," in report.describe_row(_row("unet", 5_000, 0.5, 40.0, mean_iou=0.4567))


def test_markdown_table_cells_agree_with_the_rows():
  columns = ("method", "trainable params", "held-out accuracy", "mean IoU", "train steps/s", "ms/step")
  rows = ROWS + [_row("unet", 5_000, 0.5, 40.0, mean_iou=0.4567)]
  table = report.markdown_table(rows, columns)
  assert table.splitlines()[0] == "| " + " | ".join(columns) + " |"
  assert table.splitlines()[1] == "|---|---:|---:|---:|---:|---:|"  # the method label left, numbers right
  for row, (method, trainable, accuracy, iou, steps, ms) in zip(rows, _cells(table), strict=True):
    count, share = re.fullmatch(r"([\d,]+) \(([\d.]+)%\)", trainable).groups()
    assert method == row["method"] and int(count.replace(",", "")) == row["trainable_params"]
    assert float(share) == pytest.approx(100 * row["trainable_params"] / row["total_params"], abs=0.005)
    assert float(accuracy.rstrip("%")) == pytest.approx(100 * row["accuracy"], abs=0.05)
    assert iou == ("—" if row["mean_iou"] is None else f"{row['mean_iou']:.3f}")
    assert float(steps) == pytest.approx(row["steps_per_second"], abs=0.005)
    assert float(ms) == pytest.approx(1000 / row["steps_per_second"], abs=0.5)
  with pytest.raises(ValueError, match=r"No cell for the columns \['speed'\]"):
    report.markdown_table(rows, ("method", "speed"))


def test_benchmark_methods_table_gives_step_time_ratios_to_lora():
  rows = list(reversed(ROWS))  # the LoRA row need not come first
  table = methods_table(rows)
  for row, cells in zip(rows, _cells(table), strict=True):
    assert cells[0] == row["method"]
    assert float(cells[3]) == pytest.approx(ROWS[0]["steps_per_second"] / row["steps_per_second"], abs=0.005)
  with pytest.raises(ValueError, match="needs the 'lora' row"):
    methods_table(ROWS[1:])


def test_plot_has_a_point_per_row_and_is_saved_as_png(tmp_path):
  fig = report.accuracy_vs_params_figure(ROWS, "title")
  (ax,) = fig.axes
  points = [c.get_offsets()[0] for c in ax.collections]
  np.testing.assert_allclose(points, [(r["trainable_params"], 100 * r["accuracy"]) for r in ROWS])
  assert [t.get_text() for t in ax.texts] == ["lora", "full"] and ax.get_xscale() == "log"
  report.save_figure(fig, str(tmp_path / "plot.png"), dpi=50)
  assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert fig.number not in plt.get_fignums()  # closed


def test_write_report_makes_the_directory_writes_and_prints(tmp_path, capsys):
  path = tmp_path / "new" / "results.md"
  report.write_report(str(path), "| a |\n")
  assert path.read_text(encoding="utf-8") == "| a |\n"
  assert "| a |" in capsys.readouterr().out
