r"""Steps per second of the quickstart train step on 1 device vs N fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.harness [--steps 400]

Runs the quickstart config in-process on a mesh of 1 device, then of all devices with
replicated and with FSDP-sharded state, reads the steps/s the loop logs (after compilation),
and prints a markdown table of steps/s and the ratio to the 1-device run in the same process. On a
CPU the "devices" share the same cores, so the ratio measures sharding overhead, not speed-up.
"""

import argparse
import json
import os
import tempfile

import jax
import numpy as np

from configs import quickstart
from jaxpeft.train.loop import train_and_evaluate


def _steps_per_second(num_devices: int, fsdp: bool, steps: int, data_dir: str) -> float:
  """Median of the logged steps/s over 10 intervals, skipping the first (it holds compilation)."""
  config = quickstart.get_config()
  config.dataset.data_dir = data_dir
  config.sharding.num_devices, config.sharding.fsdp = num_devices, fsdp
  config.num_train_steps, config.log_every = steps, steps // 10
  config.eval_every, config.progress_bar, config.export = 0, False, False
  config.checkpoint.every_steps = steps
  with tempfile.TemporaryDirectory() as workdir:
    train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rates = [r["steps_per_sec"] for r in map(json.loads, f) if r["split"] == "train"]
  return float(np.median(rates[1:]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  args = parser.parse_args()
  data_dir = os.environ.get("JAXPEFT_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
  n = jax.device_count()
  rows = [(1, False), (n, False), (n, True)]
  results = {row: _steps_per_second(*row, args.steps, data_dir) for row in rows}
  base = results[(1, False)]
  print(f"quickstart CNN, batch {quickstart.get_config().batch_size}, {os.cpu_count()} CPU cores\n")
  print("| devices | state | steps/s | ratio to 1 device |\n|---|---|---|---|")
  for (devices, fsdp), rate in results.items():
    print(f"| {devices} | {'FSDP' if fsdp else 'replicated'} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
  main()
