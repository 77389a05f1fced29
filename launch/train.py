r"""Trains a jaxpeft experiment described by an ml_collections config file.

  python -m launch.train --config=configs/quickstart.py --workdir=workdir/quickstart \
      [--config.optimizer.name=came] [--config.batch_size=128]

`--config.key=value` overrides are parsed by `launch.config_overrides`: `None` sets any field to
None, `--config.optimizer.kwargs.<arg>=...` passes any argument to the optimizer's factory, and a
mistyped key fails with one line naming the nearest valid keys. Errors in the config, the workdir or
the disk (`jaxpeft.train.errors.UserError`) are printed as one line, with exit status 2.

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
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from jaxpeft.train.errors import UserError
from jaxpeft.train.loop import train_and_evaluate
from launch import config_overrides

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_OVERRIDES: list[tuple[str, str]] = []
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
  logging.info(
      "process %d/%d, %d local / %d global devices (%s)",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.default_backend(),
  )
  try:
    config = _CONFIG.value
    config_overrides.apply_overrides(config, _OVERRIDES)
    result = train_and_evaluate(config, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if "eval" in result:
    print(
        f"Final eval at step {result['step']}: "
        + ", ".join(f"{k}={v:.4f}" for k, v in result["eval"].items())
        + f" (process {jax.process_index()}, params_l1={result['params_l1']!r})",
        flush=True,
    )
  else:
    print(f"Stopped early at step {result['step']}; checkpoint saved. Run again to resume.", flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the `--config.<key>=<value>` overrides set aside for `main`."""
  try:
    rest, overrides = config_overrides.split_argv(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  _OVERRIDES.extend(overrides)
  sys.argv = rest  # ml_collections' config flag reads overrides from sys.argv itself.
  return app.parse_flags_with_usage(rest)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
