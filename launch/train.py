r"""Trains a jaxpeft experiment described by an ml_collections config file.

  python -m launch.train --config=configs/quickstart.py --workdir=workdir/quickstart \
      [--config.optimizer.name=came] [--config.batch_size=128]

The config is locked: a mistyped `--config.key=value` fails with the list of keys that exist.

Multi-host (one process per host; the same command on every host):
  * TPU pod: `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd jaxpeft &&
    python -m launch.train --config=configs/quickstart.py --workdir=gs://BUCKET/run
    --multihost"` — `jax.distributed.initialize()` discovers the pod by itself.
  * GPU hosts (or several processes on one host): on each of N processes
    `python -m launch.train ... --multihost --coordinator_address=HOST0:1234
    --num_processes=N --process_id=I`.
  * CPU processes (tests): the same flags; gloo collectives are switched on for CPU.
"""

import logging as pylogging

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from jaxpeft.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins the multi-process job (no-op unless --multihost)."""
  if not _MULTIHOST.value:
    return
  if _COORDINATOR.value:  # Explicit processes: let CPU devices run collectives across them too.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
  )


class _QuietLibraries(pylogging.Filter):
  """Keeps Orbax's per-save INFO chatter off the console (its warnings still show)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed()
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if "eval" in result:
    print(f"Final eval at step {result['step']}: " +
          ", ".join(f"{k}={v:.4f}" for k, v in result["eval"].items()) +
          f" (process {jax.process_index()}, params_l1={result['params_l1']!r})", flush=True)
  else:
    print(f"Stopped early at step {result['step']}; checkpoint saved. Run again to resume.", flush=True)


if __name__ == "__main__":
  app.run(main)
