r"""Pretrain, then adapt: a ViT across digit classes and a UNet across an image domain shift, on CPU.

  python -m experiments.vision_adapt --workdir=workdir/vision_adapt

For each recipe (`configs/digits_vit.py`, `configs/digits_unet.py`) it trains the `pretrain`
stage, then every adaptation method from that run's export, each by the harness
(`jaxpeft.train.loop.train_and_evaluate`) in `<workdir>/<recipe>/<method>/` (a fresh run: an
earlier run there is deleted first). Then it writes `<workdir>/results.md`: recipe, method,
trainable parameters, held-out accuracy (per pixel for the UNet) and mean IoU (UNet), training
steps per second (the harness's median over its log intervals after the first, so without
compilation, evaluation and export) and wall time.

`--recipes=digits_unet` runs one recipe, `--methods=pretrain,lora` a subset of methods (the
pretrain stage is needed once; later runs may skip it), `--config_arg_suffix=:smoke` the smoke
variants (a few steps each).
"""

import importlib
import os
import shutil
import time
from collections.abc import Sequence

from absl import app, flags, logging

from configs import digits_recipe
from jaxpeft.train.loop import train_and_evaluate

RECIPES = ("digits_vit", "digits_unet")

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")
_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), "Config modules under configs/ to run.")
_METHODS = flags.DEFINE_list("methods", [], "Methods to run (default: every method of each recipe).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets).")
_SUFFIX = flags.DEFINE_string("config_arg_suffix", "", "Appended to each method's config argument, e.g. ':smoke'.")
flags.mark_flags_as_required(["workdir"])


def run_method(recipe: str, method: str, workdir: str, data_dir: str = "", suffix: str = "") -> dict:
  """Trains `method` of `configs/<recipe>.py` in `<workdir>/<recipe>/<method>`; returns its table row.

  Adaptation methods start from `<workdir>/<recipe>/pretrain/export/params`.
  """
  config = importlib.import_module(f"configs.{recipe}").get_config(method + suffix)
  config.dataset.data_dir = data_dir
  if method != digits_recipe.PRETRAIN:
    config.init_from.params = os.path.abspath(os.path.join(workdir, recipe, digits_recipe.PRETRAIN, "export", "params"))
  run_dir = os.path.join(workdir, recipe, method)
  shutil.rmtree(run_dir, ignore_errors=True)
  start = time.time()
  result = train_and_evaluate(config, run_dir)
  return {
      "recipe": recipe,
      "method": method,
      "trainable_params": result["trainable_params"],
      "total_params": result["total_params"],
      "accuracy": result["eval"]["accuracy"],
      "mean_iou": result["eval"].get("mean_iou"),
      "steps_per_second": result["steps_per_sec"],
      "seconds": time.time() - start,
  }


def markdown_table(rows: Sequence[dict]) -> str:
  """The results table (one row per recipe and method)."""
  lines = [
      "| recipe | method | trainable params | held-out accuracy | mean IoU | train steps/s | wall time |",
      "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    share = f"{100 * r['trainable_params'] / r['total_params']:.1f}%"
    iou = "—" if r["mean_iou"] is None else f"{r['mean_iou']:.3f}"
    lines.append(
        f"| {r['recipe']} | {r['method']} | {r['trainable_params']:,} ({share}) | {100 * r['accuracy']:.1f}% |"
        f" {iou} | {r['steps_per_second']:.1f} | {r['seconds']:.0f} s |"
    )
  return "\n".join(lines)


NOTES = (
    "digits_vit: pretrained on digits 0-4, rows other than `pretrain` adapt to digits 5-9 with a new head"
    " (accuracy on the test images of 5-9). digits_unet: per-pixel labels (0 background, digit + 1 on"
    " strokes), pretrained on clean images, rows other than `pretrain` adapt to inverted images (1 -"
    " intensity); accuracy is per pixel on the inverted test split. Trainable params: share of the model's."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [r for r in _RECIPES.value if r not in RECIPES]
  if unknown:
    raise app.UsageError(f"--recipes: unknown {unknown}; choose from {list(RECIPES)}.")
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  rows, start = [], time.time()
  for recipe in _RECIPES.value:
    methods = list(importlib.import_module(f"configs.{recipe}").RECIPE.methods)
    for method in _METHODS.value or methods:
      if method not in methods:
        raise app.UsageError(f"--methods: {method!r} is not a method of configs/{recipe}.py ({methods}).")
      print(f"{recipe} {method} ...", flush=True)
      rows.append(run_method(recipe, method, workdir, _DATA_DIR.value, _SUFFIX.value))
      r = rows[-1]
      print(f"{recipe} {method}: accuracy {100 * r['accuracy']:.1f}%, mean IoU {r['mean_iou']},"
            f" {r['trainable_params']:,} trainable params, {r['steps_per_second']:.1f} steps/s,"
            f" {r['seconds']:.0f} s", flush=True)
  table = markdown_table(rows)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n\n" + NOTES + f"\n\nTotal wall time: {time.time() - start:.0f} s.\n")
  print("\n" + table + f"\n\nTotal wall time {time.time() - start:.0f} s; results.md is in {workdir}.", flush=True)


if __name__ == "__main__":
  app.run(main)
