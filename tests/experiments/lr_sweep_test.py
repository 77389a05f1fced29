"""experiments/lr_sweep.py's helpers (experiments/harness_runs.py): learning rates chosen on a validation slice."""

import json
import os

import numpy as np
import pytest

from configs import digits_unet, digits_vit
from experiments.harness_runs import (
    SWEEP_TABLE,
    apply_overrides,
    best_learning_rates,
    holdout_splits,
    metric_of,
    parse_grids,
    sweep_config_module,
    sweep_table,
    use_validation_slice,
)
from jaxpeft.data import input_pipeline

GRID = (1e-4, 1e-1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A smoke sweep of the ViT recipe's linear probe (pretrain included), with its own data dir."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("sweep"))
  rows = sweep_config_module(
      "digits_vit", {"linear_probe": GRID}, workdir, data_dir=data_dir, suffix=":smoke", command="test"
  )
  return workdir, data_dir, rows


def _table(workdir):
  """(method, learning rate, validation value in %, chosen) of each row of the written table."""
  with open(os.path.join(workdir, SWEEP_TABLE), encoding="utf-8") as f:
    lines = [line for line in f if line.startswith("| ") and not line.startswith("| method")]
  cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
  return [(m, float(lr), float(value.rstrip("%")), chosen == "yes") for m, lr, value, chosen in cells]


def test_the_chosen_learning_rate_is_the_argmax_of_the_written_validation_accuracies(sweep):
  workdir, _, rows = sweep
  table = _table(workdir)
  assert [(m, lr) for m, lr, _, _ in table] == [("linear_probe", lr) for lr in GRID]
  chosen = [row for row in table if row[3]]
  assert len(chosen) == 1 and chosen[0][2] == max(value for _, _, value, _ in table), table
  assert best_learning_rates(rows) == {"linear_probe": chosen[0][1]}
  for (_, _, value, _), row in zip(table, rows):
    assert value == pytest.approx(100 * row["accuracy"], abs=0.05)


def test_every_run_trains_on_the_train_slice_and_is_evaluated_on_the_validation_slice(sweep):
  workdir, _, rows = sweep
  run_dirs = [os.path.join(workdir, "pretrain")] + [row["run_dir"] for row in rows]
  for run_dir, row in zip(run_dirs, [None] + rows):
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
      dataset = json.load(f)["dataset"]
    assert (dataset["train_split"], dataset["eval_split"]) == ("train[:85%]", "train[85%:]"), run_dir
    if row is not None:  # the table's value is this run's final evaluation
      with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        final_eval = [r for r in map(json.loads, f) if r["split"] == "eval"][-1]
      assert final_eval["accuracy"] == pytest.approx(row["value"])
  # Adaptation starts from the sweep's own pretrain run, not from a run that saw the validation slice.
  with open(os.path.join(rows[0]["run_dir"], "config.json"), encoding="utf-8") as f:
    assert json.load(f)["init_from"]["params"] == os.path.abspath(
        os.path.join(workdir, "pretrain", "export", "params")
    )


def test_the_validation_slice_is_held_out_of_training_and_disjoint_from_test(sweep):
  _, data_dir, _ = sweep
  train_slice, validation_slice = holdout_splits()

  def rows_and_labels(split):
    source, _ = input_pipeline.get_data_source("jaxpeft_digits", split, data_dir)
    batch = input_pipeline.fetch_batch(source, range(len(source)))
    return set(batch["index"].tolist()), batch["label"]

  train, _ = rows_and_labels(train_slice)
  validation, labels = rows_and_labels(validation_slice)
  whole, _ = rows_and_labels("train")
  test, _ = rows_and_labels("test")
  assert not train & validation and train | validation == whole and not validation & test
  assert len(validation) == pytest.approx(0.15 * len(whole), abs=1)
  assert np.bincount(labels, minlength=10).min() >= 10  # every digit is in the validation slice


def test_best_learning_rates_skips_diverged_runs_and_breaks_ties_by_grid_order():
  rows = [
      {"method": "a", "learning_rate": 1.0, "value": 0.5, "metric": "accuracy"},
      {"method": "a", "learning_rate": 2.0, "value": 0.7, "metric": "accuracy"},
      {"method": "a", "learning_rate": 3.0, "value": None, "metric": None},
      {"method": "b", "learning_rate": 1.0, "value": 0.6, "metric": "accuracy"},
      {"method": "b", "learning_rate": 2.0, "value": 0.6, "metric": "accuracy"},
  ]
  assert best_learning_rates(rows) == {"a": 2.0, "b": 1.0}
  assert "| a | 3 | diverged |  |" in sweep_table(rows)
  with pytest.raises(ValueError, match="one metric"):
    sweep_table(rows + [{"method": "c", "learning_rate": 1.0, "value": 0.2, "metric": "mean_iou"}])


def test_segmentation_runs_are_compared_by_mean_iou():
  assert metric_of({"accuracy": 0.9, "mean_iou": 0.4}) == "mean_iou"
  assert metric_of({"accuracy": 0.9, "mean_iou": None}) == "accuracy"


def test_grids_overrides_and_splits_refuse_bad_input():
  assert parse_grids(["lora=2e-3,5e-3", "full=1e-4"]) == {"lora": (2e-3, 5e-3), "full": (1e-4,)}
  for bad in (["lora"], ["lora=fast"], ["lora=-1e-3"], ["lora=1e-3,1e-3"], ["lora=1e-3", "lora=2e-3"]):
    with pytest.raises(ValueError, match="<method>=<lr>"):
      parse_grids(bad)
  config = digits_unet.get_config("lora_c")
  apply_overrides(config, ["num_train_steps=600", "dataset.shift=rotate90"])
  assert (config.num_train_steps, config.dataset.shift) == (600, "rotate90")
  with pytest.raises(ValueError, match="existing config key"):
    apply_overrides(config, ["dataset.shfit=rotate90"])
  config = digits_vit.get_config("lora")
  config.dataset.train_split = "train[:50%]"
  with pytest.raises(ValueError, match="train_split"):
    use_validation_slice(config)
  with pytest.raises(ValueError, match="cannot sweep"):
    sweep_config_module("digits_vit", {"pretrain": (1e-3,)}, "/nonexistent")
