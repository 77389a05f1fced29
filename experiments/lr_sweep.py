r"""Learning rates chosen on a validation slice of the training split, never on the test split.

  python -m experiments.lr_sweep --config=minilm_text --workdir=workdir/lr_sweep_minilm \
      --grid=lora=2e-3,5e-3,1e-2 --grid=full=5e-5,1e-4,2e-4

For each method of `configs/<config>.py` with a `--grid`, every learning rate is trained from
scratch (`<workdir>/<method>/lr_<lr>/`) on the training split minus its last 15% ('train[:85%]')
and evaluated on that 15% ('train[85%:]'); the chosen learning rate of a method is the one with
the best validation accuracy (mean IoU for per-pixel predictions; the first in grid order on a
tie). `<workdir>/lr_sweep.md` (rewritten after every run) holds the table (method, learning
rate, validation metric, chosen), the splits, the command and the date.

A "pretrain, then adapt" recipe (configs/digits_vit.py, configs/digits_unet.py) first pretrains
on the same training slice (`<workdir>/pretrain/`), or starts from `--pretrain_from=EXPORT`.
`--override=num_train_steps=600 --override=dataset.shift=rotate90` changes the swept methods'
configs (not the pretrain stage's); `--config_arg_suffix=:smoke` sweeps the smoke variants.
The helpers are in experiments/harness_runs.py.
"""

import shlex
import sys

from absl import app, flags, logging

from experiments import harness_runs

_CONFIG = flags.DEFINE_string("config", None, "A config module under configs/, e.g. minilm_text or digits_unet.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and lr_sweep.md.")
_GRID = flags.DEFINE_multi_string("grid", [], "'<method>=<lr>,<lr>,...', once per swept method.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "'<dotted config key>=<value>' for the swept methods.")
_PRETRAIN_FROM = flags.DEFINE_string(
    "pretrain_from", "", "Recipes: a pretrain export trained on the training slice only ('' trains one)."
)
_VALIDATION_PERCENT = flags.DEFINE_integer(
    "validation_percent", harness_runs.VALIDATION_PERCENT, "Share of the training split held out."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data dir ('' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets)."
)
_SUFFIX = flags.DEFINE_string("config_arg_suffix", "", "Appended to each method's config argument, e.g. ':smoke'.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    grids = harness_runs.parse_grids(_GRID.value)
  except ValueError as e:
    raise app.UsageError(f"--grid: {e}") from e
  if not grids:
    raise app.UsageError("Give at least one --grid=<method>=<lr>,<lr>,...")
  logging.set_verbosity(logging.WARNING)
  rows = harness_runs.sweep_config_module(
      _CONFIG.value,
      grids,
      _WORKDIR.value,
      data_dir=_DATA_DIR.value,
      suffix=_SUFFIX.value,
      overrides=_OVERRIDE.value,
      pretrain_from=_PRETRAIN_FROM.value,
      validation_percent=_VALIDATION_PERCENT.value,
      command=shlex.join(["python", "-m", "experiments.lr_sweep", *sys.argv[1:]]),
  )
  print(harness_runs.sweep_table(rows), flush=True)


if __name__ == "__main__":
  app.run(main)
