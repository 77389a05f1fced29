"""Tests of launch/train.py as a user runs it: real subprocesses, signals and two processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from jaxpeft.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 160
OVERRIDES = {"num_train_steps": STEPS, "log_every": 20, "checkpoint.every_steps": 20}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _command(workdir, data_dir, *extra):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return [
      sys.executable,
      "-m",
      "launch.train",
      "--config=configs/quickstart.py:smoke",
      f"--workdir={workdir}",
      f"--config.dataset.data_dir={data_dir}",
      *flags,
      *extra,
  ]


def _start(cmd, env=None):
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, f"process ended before checkpoint {step}:\n{proc.stdout.read()}"
    assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
    time.sleep(0.02)


def _saved_params(workdir, step):
  """The params of a checkpoint as numpy arrays, whatever devices wrote it."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), checkpointer.metadata(path).item_metadata.tree
  )
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _reference_run(data_dir, workdir, **sharding):
  config = quickstart.get_config("smoke")
  config.dataset.data_dir = data_dir
  config.num_train_steps, config.log_every, config.checkpoint.every_steps = STEPS, 20, 20
  config.sharding.update(sharding)
  return train_and_evaluate(config, workdir)


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path):
  reference = _reference_run(data_dir, str(tmp_path / "reference"))
  workdir = str(tmp_path / "killed")
  proc = _start(_command(workdir, data_dir))
  _wait_for_checkpoint(proc, workdir, 20)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert not os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS))), "killed too late"
  resumed = subprocess.run(_command(workdir, data_dir), cwd=ROOT, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Final eval at step {STEPS}" in resumed.stdout
  for ours, ref in zip(_saved_params(workdir, STEPS), jax.tree.leaves(reference["state"].params)):
    np.testing.assert_array_equal(ours, np.asarray(ref))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
  workdir = str(tmp_path)
  proc = _start(_command(workdir, data_dir))
  _wait_for_checkpoint(proc, workdir, 20)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "Stopped early at step" in out
  stopped_at = int(out.split("Stopped early at step ")[1].split(";")[0])
  assert 20 <= stopped_at < STEPS
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped_at)))


def test_mistyped_config_key_fails_loudly(data_dir, tmp_path):
  result = subprocess.run(
      _command(str(tmp_path), data_dir, "--config.optimizer.nmae=came"), cwd=ROOT, capture_output=True, text=True
  )
  assert result.returncode != 0
  assert "Unknown config key --config.optimizer.nmae; nearest valid keys: optimizer.name" in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_two_processes_train_one_sharded_model(data_dir, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  workdir = str(tmp_path / "multi")
  procs = [
      _start(
          _command(
              workdir,
              data_dir,
              "--multihost",
              f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2",
              f"--process_id={i}",
              "--config.sharding.fsdp=True",
          ),
          env,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  l1 = [float(out.split("params_l1=")[1].split(")")[0]) for out in outputs]
  assert l1[0] == l1[1]
  reference = _reference_run(data_dir, str(tmp_path / "single"), num_devices=4, fsdp=True)
  for ours, ref in zip(_saved_params(workdir, STEPS), jax.tree.leaves(reference["state"].params)):
    np.testing.assert_allclose(ours, np.asarray(ref), rtol=1e-4, atol=1e-6)
