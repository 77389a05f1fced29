r"""Test-time adaptation of a model pretrained by launch/train.py, over a corrupted test stream.

  python -m launch.train --config=configs/fashion_resnet.py --workdir=workdir/fashion_resnet
  python -m launch.adapt --config=configs/tta_tent.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_tent [--config.stream.setting=continual] [--config.stream.batch_size=1]

Reads `<pretrained>/config.json` (the model), `<pretrained>/export/params` and, for models with
BatchNorm, `<pretrained>/export/model_state`. Writes `<workdir>/metrics.jsonl` (one line per batch:
corruption, severity, online error of the batch and running error), `<workdir>/results.json` (error
per corruption and their mean) and shows a progress bar.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxpeft.train.tta_loop import adapt

_CONFIG = config_flags.DEFINE_config_file("config", None, "TTA config file (configs/tta_*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = adapt(_CONFIG.value, _WORKDIR.value)
  print(
      "Error (%) per corruption: " + ", ".join(f"{k}={100 * v:.1f}" for k, v in result["errors"].items()),
      flush=True,
  )


if __name__ == "__main__":
  app.run(main)
