"""experiments/merging.py without training: the tasks, the normalisation, the claim checks and the report."""

import numpy as np

from experiments import merging as experiment


def _rows(**averages):
  """Per-task accuracies whose normalised average (individual = 0.8 everywhere) is the given value."""
  rows = {"individual": [0.8] * len(experiment.TASKS), "pretrained": [0.4] * len(experiment.TASKS)}
  rows.update({m: [0.8 * v] * len(experiment.TASKS) for m, v in averages.items()})
  return rows


def test_claims_hold_and_fail_on_the_numbers():
  good = dict(averaging=0.6, task_arithmetic=0.7, ties=0.8, fisher=0.6, atlas=0.7)
  norm = {m: float(np.mean(v)) for m, v in experiment.normalised(_rows(**good)).items()}
  np.testing.assert_allclose(norm["ties"], 0.8)
  assert [ok for _, ok, _ in experiment.check_claims(norm, "full")] == [True, True, True]
  bad = dict(averaging=0.75, task_arithmetic=0.7, ties=0.65, fisher=0.6, atlas=0.69)
  norm = {m: float(np.mean(v)) for m, v in experiment.normalised(_rows(**bad)).items()}
  claims = experiment.check_claims(norm, "lora")
  assert [ok for _, ok, _ in claims] == [False, False, False]
  assert claims[0][2] == "ties 65.0%, task_arithmetic 70.0%, averaging 75.0%"


def test_report_has_one_table_per_kind_and_the_claims():
  rows = _rows(**{m: 0.5 for m in experiment.METHODS})
  text, fig = experiment.report({"full": rows, "lora": rows}, 60.0, "python -m experiments.merging")
  assert text.count("| ties | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |") == 2
  assert text.count("| NO |") == 2 and text.count("| yes |") == 4  # equal numbers: only ">" fails
  assert "load average" in text
  assert len(fig.axes[0].patches) == 2 * (len(experiment.METHODS) + 1)


def test_tasks_are_the_shifted_digits():
  clean, tasks = experiment.load_tasks()
  assert sorted(tasks) == sorted(experiment.TASKS)
  x, y = clean["test"]
  np.testing.assert_array_equal(tasks["rotate90+invert"]["test"][0], 1.0 - np.rot90(x, 1, axes=(1, 2)))
  np.testing.assert_array_equal(tasks["transpose"]["test"][1], y)
  assert len(clean["validation"][1]) == experiment.VALIDATION and len(clean["train"][1]) == 1437 - 287
