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

import functools
import importlib
import os

from absl import app, flags, logging

from configs import digits_recipe
from experiments import report
from experiments.harness_runs import run_harness

RECIPES = ("digits_vit", "digits_unet")

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")
_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), "Config modules under configs/ to run.")
_METHODS = flags.DEFINE_list("methods", [], "Methods to run (default: every method of each recipe).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data dir ('' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets)."
)
_SUFFIX = flags.DEFINE_string("config_arg_suffix", "", "Appended to each method's config argument, e.g. ':smoke'.")
flags.mark_flags_as_required(["workdir"])


def run_method(recipe: str, method: str, workdir: str, data_dir: str = "", suffix: str = "") -> report.Row:
  """Trains `method` of `configs/<recipe>.py` in `<workdir>/<recipe>/<method>`; returns its table row.

  Adaptation methods start from `<workdir>/<recipe>/pretrain/export/params`.
  """
  config = importlib.import_module(f"configs.{recipe}").get_config(method + suffix)
  config.dataset.data_dir = data_dir
  if method != digits_recipe.PRETRAIN:
    config.init_from.params = os.path.abspath(
        os.path.join(workdir, recipe, digits_recipe.PRETRAIN, "export", "params")
    )
  return {"recipe": recipe, **run_harness(config, os.path.join(workdir, recipe, method), method)}


COLUMNS = ("recipe", "method", "trainable params", "held-out accuracy", "mean IoU", "train steps/s", "wall time")
NOTES = (
    "digits_vit: pretrained on digits 0-4, rows other than `pretrain` adapt to digits 5-9 with a new head"
    " (accuracy on the test images of 5-9). digits_unet: per-pixel labels (0 background, digit + 1 on"
    " strokes), pretrained on clean images, rows other than `pretrain` adapt to images rotated by"
    " 90 degrees (labels rotated with them); accuracy is per pixel on the rotated test split."
    " Trainable params: share of the model's."
)


def main(argv):
  report.check_command_line(argv, "recipes", _RECIPES.value, RECIPES)
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  jobs = {}
  for recipe in _RECIPES.value:
    methods = list(importlib.import_module(f"configs.{recipe}").RECIPE.methods)
    for method in _METHODS.value or methods:
      if method not in methods:
        raise app.UsageError(f"--methods: {method!r} is not a method of configs/{recipe}.py ({methods}).")
      jobs[f"{recipe} {method}"] = functools.partial(
          run_method, recipe, method, workdir, _DATA_DIR.value, _SUFFIX.value
      )
  rows, seconds = report.run_each(jobs, report.describe_row)
  report.write_report(
      os.path.join(workdir, "results.md"),
      report.markdown_table(rows, COLUMNS)
      + "\n\n"
      + NOTES
      + f"\n\nTotal wall time: {sum(seconds.values()):.0f} s.\n",
  )


if __name__ == "__main__":
  app.run(main)
