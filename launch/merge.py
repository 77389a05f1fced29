r"""Merges the exports of several launch.train runs into one model (or one adapter).

  python -m launch.merge --config=configs/merge_models.py:ties --workdir=workdir/merged \
      --config.inputs=workdir/task_a,workdir/task_b --config.base=workdir/pretrain/export/params

Writes `<workdir>/export/params` (Orbax), `<workdir>/export/adapter.safetensors` and `<workdir>/export/peft/`
(PEFT's adapter_config.json + adapter_model.safetensors) when the inputs were adapters (`:adapter_linear`,
`:adapter_ties`), and `<workdir>/merge_summary.json`.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxpeft.train.merge_exports import merge_workdirs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Merge config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the merged export and summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  merge_workdirs(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
