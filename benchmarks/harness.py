r"""Steps per second of the quickstart train step on 1 device vs N fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.harness [--steps 400]

Runs the quickstart config in-process twice (mesh over 1 device, then over all devices, each
with data parallelism and with FSDP), times the training loop after compilation, and prints a
markdown table of steps/s and the ratio to the 1-device run measured in the same process. On a
CPU the "devices" share the same cores, so the ratio measures sharding overhead, not speed-up.
"""

import argparse
import os
import tempfile
import time

import jax

from configs import quickstart
from jaxpeft.train.loop import train_and_evaluate


def _steps_per_second(num_devices: int, fsdp: bool, steps: int, data_dir: str) -> float:
  config = quickstart.get_config()
  config.dataset.data_dir = data_dir
  config.sharding.num_devices, config.sharding.fsdp = num_devices, fsdp
  config.eval_every, config.log_every, config.progress_bar = 0, steps, False
  config.checkpoint.every_steps = 10 * steps
  timings = []
  for total in (steps // 4, steps):  # the difference cancels compilation, init and eval
    config.num_train_steps = total
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      train_and_evaluate(config, workdir)
      timings.append(time.perf_counter() - start)
  return (steps - steps // 4) / (timings[1] - timings[0])


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
