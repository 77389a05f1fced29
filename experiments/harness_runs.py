"""Harness runs as table rows, shared by experiments/flagship.py, experiments/claims/ and experiments/lr_sweep.py.

`run_harness` trains one config and returns its row. The rest choose learning rates without
looking at the test split: `sweep_config_module` trains each (method, learning rate) of a grid on
the training split minus a held-out validation slice (`holdout_splits`), evaluates on that slice,
picks per method the learning rate of the best validation metric (`best_learning_rates`) and writes
the table (`sweep_table`).
"""

import ast
import importlib
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from configs import digits_recipe
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.metrics import NonFiniteLossError

VALIDATION_PERCENT = 15
SWEEP_TABLE = "lr_sweep.md"


def run_harness(config: ml_collections.ConfigDict, run_dir: str, name: str) -> dict[str, Any]:
  """Trains `config` from scratch in `run_dir` (an earlier run there is deleted first).

  Returns:
    The row `name` of a results table: `trainable_params`, `total_params`, `adapter_bytes`,
    `params_bytes` (None without export), held-out `accuracy`, `mean_iou` (None unless the
    predictions are per pixel), `steps_per_second` (the harness's median over its log intervals
    after the first) and wall-clock `seconds`.
  """
  shutil.rmtree(run_dir, ignore_errors=True)
  start = time.time()
  result = train_and_evaluate(config, run_dir)
  seconds = time.time() - start
  return {
      "method": name,
      "trainable_params": result["trainable_params"],
      "total_params": result["total_params"],
      "adapter_bytes": result.get("adapter_bytes"),
      "params_bytes": result.get("params_bytes"),
      "accuracy": result["eval"]["accuracy"],
      "mean_iou": result["eval"].get("mean_iou"),
      "steps_per_second": result["steps_per_sec"],
      "seconds": seconds,
  }


def holdout_splits(validation_percent: int = VALIDATION_PERCENT) -> tuple[str, str]:
  """TFDS slices `('train[:85%]', 'train[85%:]')`: the training split minus its last 15%, and that 15%.

  The slices are fixed (positions in the stored split), disjoint and together the whole training
  split. TFDS stores a split's examples in the order of a hash of their keys, so the last 15% is
  not the end of the builder's own (e.g. sorted) order.
  """
  if not 0 < validation_percent < 100:
    raise ValueError(f"validation_percent={validation_percent}: hold out a percentage in (0, 100), e.g. 15.")
  cut = 100 - validation_percent
  return f"train[:{cut}%]", f"train[{cut}%:]"


def use_validation_slice(config: ml_collections.ConfigDict, validation_percent: int = VALIDATION_PERCENT) -> None:
  """Makes `config` train on 'train' minus the validation slice and evaluate on the slice (in place)."""
  if config.dataset.train_split != "train":
    raise ValueError(
        f"config.dataset.train_split={config.dataset.train_split!r}: the validation slice is cut from the"
        " whole 'train' split; leave train_split='train' in the config."
    )
  config.dataset.train_split, config.dataset.eval_split = holdout_splits(validation_percent)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies 'dotted.key=value' strings to `config` (value: a Python literal, else a string)."""
  for override in overrides:
    key, sep, text = override.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not sep or not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(
          f"Override {override!r}: use 'key=value' with an existing config key, e.g."
          f" 'num_train_steps=600' or 'dataset.shift=rotate90'; top-level keys: {sorted(config)}."
      )
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node[leaf] = value


def parse_grids(specs: Sequence[str]) -> dict[str, tuple[float, ...]]:
  """{'lora': (2e-3, 5e-3)} from specs like 'lora=2e-3,5e-3' (one per method)."""
  grids = {}
  for spec in specs:
    method, sep, values = spec.partition("=")
    try:
      grid = tuple(float(v) for v in values.split(","))
    except ValueError:
      grid = ()
    if (
        not sep
        or not method
        or not grid
        or any(lr <= 0 for lr in grid)
        or len(set(grid)) < len(grid)
        or method in grids
    ):
      raise ValueError(
          f"Grid {spec!r}: use '<method>=<lr>,<lr>,...' with distinct positive learning rates, once"
          " per method, e.g. 'lora=2e-3,5e-3,1e-2'."
      )
    grids[method] = grid
  return grids


def metric_of(row: Mapping[str, Any]) -> str:
  """The row's validation metric: 'mean_iou' for per-pixel predictions, else 'accuracy'."""
  return "accuracy" if row.get("mean_iou") is None else "mean_iou"


def sweep_learning_rates(
    make_config: Callable[[str], ml_collections.ConfigDict],
    grids: Mapping[str, Sequence[float]],
    workdir: str,
    *,
    validation_percent: int = VALIDATION_PERCENT,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
  """Trains `make_config(method)` at each learning rate of `grids[method]` on the validation split-off.

  Each run is `<workdir>/<method>/lr_<lr>` (fresh). A run whose loss becomes NaN or Inf is kept as a
  row with `value` None. `on_row(rows)` is called after every run (e.g. to rewrite the table).

  Returns:
    `run_harness` rows plus `learning_rate`, `train_split`, `eval_split`, `run_dir`, `metric` (see
    `metric_of`) and `value` (the validation metric); both None if the run diverged.
  """
  rows = []
  for method, grid in grids.items():
    for lr in grid:
      config = make_config(method)
      use_validation_slice(config, validation_percent)
      config.optimizer.learning_rate = lr
      run_dir = os.path.join(workdir, method, f"lr_{lr:g}")
      splits = {
          "learning_rate": lr,
          "train_split": config.dataset.train_split,
          "eval_split": config.dataset.eval_split,
          "run_dir": run_dir,
      }
      try:
        row = {**run_harness(config, run_dir, method), **splits}
        row.update(metric=metric_of(row), value=row[metric_of(row)])
      except NonFiniteLossError:
        row = {"method": method, **splits, "metric": None, "value": None}
      rows.append(row)
      if on_row is not None:
        on_row(rows)
  return rows


def best_learning_rates(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Per method, the learning rate of the highest validation `value` (the first in grid order on a tie)."""
  best: dict[str, Mapping[str, Any]] = {}
  for row in rows:
    if row["value"] is not None and (row["method"] not in best or row["value"] > best[row["method"]]["value"]):
      best[row["method"]] = row
  return {method: row["learning_rate"] for method, row in best.items()}


def _cell(metric: str, value: float | None) -> str:
  if value is None:
    return "diverged"
  return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.4f}"


def sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: method, learning rate, validation metric, chosen ('yes' on each method's best row)."""
  metrics = {row["metric"] for row in rows if row["metric"] is not None}
  if len(metrics) > 1:
    raise ValueError(f"One sweep table compares one metric; these rows have {sorted(metrics)}.")
  metric = metrics.pop() if metrics else "accuracy"
  chosen = best_learning_rates(rows)
  label = {"accuracy": "accuracy", "mean_iou": "mean IoU"}[metric]
  lines = [f"| method | learning rate | validation {label} | chosen |", "|---|---:|---:|:---:|"]
  for row in rows:
    mark = "yes" if chosen.get(row["method"]) == row["learning_rate"] else ""
    lines.append(f"| {row['method']} | {row['learning_rate']:g} | {_cell(metric, row['value'])} | {mark} |")
  return "\n".join(lines)


def sweep_markdown(rows: Sequence[Mapping[str, Any]], command: str) -> str:
  """The sweep's table, its splits, the chosen learning rates, the command and the date."""
  chosen = best_learning_rates(rows)
  seconds = sum(r.get("seconds", 0.0) for r in rows)
  return (
      sweep_table(rows) + "\n\n"
      f"Trained on `{rows[0]['train_split']}`, evaluated on the held-out `{rows[0]['eval_split']}` (never the"
      " test split); one seed (config.seed).\n"
      f"Chosen: {', '.join(f'{m}={lr:g}' for m, lr in chosen.items())}.\n"
      f"Command: `{command}`\n"
      f"Finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(rows)} runs, {math.ceil(seconds)} s"
      " of training and evaluation.\n"
  )


def sweep_config_module(
    name: str,
    grids: Mapping[str, Sequence[float]],
    workdir: str,
    *,
    data_dir: str = "",
    suffix: str = "",
    overrides: Sequence[str] = (),
    pretrain_from: str = "",
    validation_percent: int = VALIDATION_PERCENT,
    command: str = "",
) -> list[dict[str, Any]]:
  """Sweeps `configs/<name>.py`'s methods over `grids`; writes `<workdir>/lr_sweep.md` after every run.

  For a "pretrain, then adapt" recipe (`configs/digits_recipe.py`) the adaptation methods start
  from a pretrain run on the same training slice, evaluated on the validation slice, in
  `<workdir>/pretrain` (or from the export `pretrain_from`, which must have been trained without the
  validation and test examples). `overrides` ('key=value') apply to the swept methods only.
  """
  module = importlib.import_module(f"configs.{name}")
  recipe = getattr(module, "RECIPE", None)
  unknown = [m for m in grids if m not in (recipe.methods if recipe else getattr(module, "METHODS", {}))]
  if unknown or (recipe and digits_recipe.PRETRAIN in grids):
    raise ValueError(
        f"configs/{name}.py cannot sweep {unknown or [digits_recipe.PRETRAIN]}: choose from its"
        " adaptation methods (the pretrain stage runs at its configured learning rate)."
    )
  os.makedirs(workdir, exist_ok=True)
  if recipe and not pretrain_from:
    config = module.get_config(digits_recipe.PRETRAIN + suffix)
    config.dataset.data_dir = data_dir
    use_validation_slice(config, validation_percent)
    row = run_harness(config, os.path.join(workdir, digits_recipe.PRETRAIN), digits_recipe.PRETRAIN)
    print(f"pretrain: validation accuracy {row['accuracy']}, mean IoU {row['mean_iou']}", flush=True)
    pretrain_from = os.path.join(workdir, digits_recipe.PRETRAIN, "export", "params")
  pretrain_from = os.path.abspath(pretrain_from) if pretrain_from else ""  # Orbax restores absolute paths

  def make_config(method: str) -> ml_collections.ConfigDict:
    config = module.get_config(method + suffix)
    config.dataset.data_dir = data_dir
    if recipe:
      config.init_from.params = pretrain_from
    apply_overrides(config, overrides)
    return config

  def write(rows: list[dict[str, Any]]) -> None:
    with open(os.path.join(workdir, SWEEP_TABLE), "w", encoding="utf-8") as f:
      f.write(sweep_markdown(rows, command))
    last = rows[-1]
    print(
        f"{last['method']} lr={last['learning_rate']:g}: validation {last['metric']} {last['value']}", flush=True
    )

  return sweep_learning_rates(make_config, grids, workdir, validation_percent=validation_percent, on_row=write)
