"""Export at the end of a run: merged weights, and the adapter alone.

* `<workdir>/export/params` — the model's full parameter tree with any adapter merged in (zero
  inference overhead), an Orbax checkpoint that `config.init_from.params` and plain
  `ocp.StandardCheckpointer().restore` read;
* `<workdir>/export/model_state` — the model's other collections (BatchNorm's `batch_stats`), an Orbax
  checkpoint beside `params`; only for models that have them;
* `<workdir>/export/adapter.safetensors` — only the adapter leaves plus their config record
  (`jaxpeft.adapters.checkpoint.load_adapter` rebuilds it in a fresh process). Not written when the
  run trained on a rewritten base (residual-base inits, re-selections that merge into the base): those leaves
  applied to the original weights would not give the trained model, so only the merged export is;
* `<workdir>/export/base_checksum.txt` — `jaxpeft.merging.base_checksum` of the base the run started
  from, so `launch/merge.py` can refuse to merge runs of different bases. A fresh run computes it once from
  the base it builds (`record_base_checksum`, `<workdir>/base_checksum.txt`), so a resumed run exports it
  without rebuilding or reloading the base.
"""

import os
import shutil
from typing import Any

import jax
from absl import logging
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxpeft.adapters.checkpoint import save_adapter
from jaxpeft.merging.checksum import base_checksum
from jaxpeft.train.trainable import Trainable

PyTree = Any


def _bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


CHECKSUM_FILE = "base_checksum.txt"


def record_base_checksum(workdir: str, base_params: PyTree) -> None:
  """Writes `<workdir>/base_checksum.txt` for the base a fresh run starts from (export copies it)."""
  checksum = base_checksum(base_params)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CHECKSUM_FILE), "w", encoding="utf-8") as f:
      f.write(checksum + "\n")


def export(
    workdir: str,
    trainable: Trainable,
    params: PyTree,
    frozen: PyTree,
    model_state: PyTree | None = None,
) -> dict[str, int]:
  """Writes the exports; returns their sizes in bytes (`params_bytes`, `adapter_bytes`, `model_state_bytes`).

  `<workdir>/base_checksum.txt` (`record_base_checksum`) becomes `export/base_checksum.txt`.
  """
  out = os.path.join(os.path.abspath(workdir), "export")
  params_dir = os.path.join(out, "params")
  recorded = os.path.join(workdir, CHECKSUM_FILE)
  if not os.path.exists(recorded):
    logging.warning("No %s (a run started before it was recorded): no export/%s.", recorded, CHECKSUM_FILE)
  elif jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(recorded, os.path.join(out, CHECKSUM_FILE))
  merged = jax.jit(trainable.merged)(params, frozen)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, merged, force=True)
  checkpointer.wait_until_finished()
  sizes = {"params_bytes": _bytes(params_dir)}
  if model_state:
    state_dir = os.path.join(out, "model_state")
    checkpointer.save(state_dir, model_state, force=True)
    checkpointer.wait_until_finished()
    sizes["model_state_bytes"] = _bytes(state_dir)
  if trainable.adapter is not None and not trainable.adapter_fits_original_base(frozen, params):
    logging.warning(
        "No export/adapter.safetensors: this run trained %r on a rewritten base (residual init"
        " or re-selection), so the adapter alone does not apply to the original weights; use"
        " export/params (merged).",
        trainable.adapter.method,
    )
  elif trainable.adapter is not None:
    adapter = multihost_utils.process_allgather(params["adapter"], tiled=True)
    adapter_path = os.path.join(out, "adapter.safetensors")
    if jax.process_index() == 0:
      save_adapter(adapter_path, adapter, trainable.adapter)
    multihost_utils.sync_global_devices("jaxpeft_export_adapter")
    sizes["adapter_bytes"] = _bytes(adapter_path)
  return sizes
