"""Export at the end of a run: merged weights, and the adapter alone.

* `<workdir>/export/params` — the model's full parameter tree with any adapter merged in (zero
  inference overhead), an Orbax checkpoint that `config.init_from.params` and plain
  `ocp.StandardCheckpointer().restore` read;
* `<workdir>/export/adapter.safetensors` — only the adapter leaves plus their config record
  (`jaxpeft.adapters.checkpoint.load_adapter` rebuilds it in a fresh process).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxpeft.adapters.checkpoint import save_adapter
from jaxpeft.train.trainable import Trainable

PyTree = Any


def _bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def export(workdir: str, trainable: Trainable, params: PyTree, frozen: PyTree) -> dict[str, int]:
  """Writes the exports; returns their sizes in bytes (`params_bytes`, `adapter_bytes`)."""
  out = os.path.join(os.path.abspath(workdir), "export")
  params_dir = os.path.join(out, "params")
  merged = jax.jit(trainable.merged)(params, frozen)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, merged, force=True)
  checkpointer.wait_until_finished()
  sizes = {"params_bytes": _bytes(params_dir)}
  if trainable.adapter is not None:
    adapter = multihost_utils.process_allgather(params["adapter"], tiled=True)
    adapter_path = os.path.join(out, "adapter.safetensors")
    if jax.process_index() == 0:
      save_adapter(adapter_path, adapter, trainable.adapter)
    multihost_utils.sync_global_devices("jaxpeft_export_adapter")
    sizes["adapter_bytes"] = _bytes(adapter_path)
  return sizes
