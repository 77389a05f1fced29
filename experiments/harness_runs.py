"""One harness run per table row, shared by experiments/flagship.py and experiments/claims/."""

import os
import shutil
import time
from typing import Any

import ml_collections

from jaxpeft.train.loop import train_and_evaluate


def run_harness(config: ml_collections.ConfigDict, run_dir: str, name: str) -> dict[str, Any]:
  """Trains `config` from scratch in `run_dir` (an earlier run there is deleted first).

  Returns:
    The row `name` of a results table: `trainable_params`, `total_params`, `adapter_bytes`,
    `params_bytes` (None without export), held-out `accuracy`, `steps_per_second` (the harness's
    median over its log intervals after the first) and wall-clock `seconds`.
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
      "steps_per_second": result["steps_per_sec"],
      "seconds": seconds,
  }
