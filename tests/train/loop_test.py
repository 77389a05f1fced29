"""End-to-end tests of train_and_evaluate (in-process, tiny smoke config, 8 fake devices)."""

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxpeft.data import input_pipeline
from jaxpeft.train.checkpoint import Checkpointer, IncompatibleCheckpointError
from jaxpeft.train.errors import DiskFullError, UserError, WorkdirBusyError
from jaxpeft.train.loop import _workdir_lock, train_and_evaluate
from jaxpeft.train.metrics import NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return np.array([r["loss"] for r in rows if r["split"] == "train"])


def _params(result):
  return [np.asarray(x) for x in jax.tree.leaves(result["state"].params)]


def test_one_and_eight_devices_give_the_same_losses(smoke_config, tmp_path):
  one = train_and_evaluate(smoke_config(sharding__num_devices=1), str(tmp_path / "one"))
  eight = train_and_evaluate(smoke_config(), str(tmp_path / "eight"))
  losses = _train_losses(tmp_path / "one")
  assert len(losses) == 6 and np.all(np.diff(losses[:3]) != 0)
  np.testing.assert_allclose(_train_losses(tmp_path / "eight"), losses, rtol=2e-5)
  for a, b in zip(_params(one), _params(eight)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_shards_state_and_matches_data_parallel(smoke_config, tmp_path):
  dp = train_and_evaluate(smoke_config(), str(tmp_path / "dp"))
  fsdp = train_and_evaluate(smoke_config(sharding__fsdp=True), str(tmp_path / "fsdp"))
  kernel = fsdp["state"].params["base"]["dense"]["kernel"]
  assert "data" in kernel.sharding.spec, kernel.sharding
  mu = jax.tree.leaves(fsdp["state"].opt_state)[1]
  assert any(s is not None for s in mu.sharding.spec), "optimizer state should be sharded too"
  np.testing.assert_allclose(_train_losses(tmp_path / "fsdp"), _train_losses(tmp_path / "dp"), rtol=2e-5)
  for a, b in zip(_params(dp), _params(fsdp)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_pmap_matches_jit(smoke_config, tmp_path):
  train_and_evaluate(smoke_config(), str(tmp_path / "jit"))
  pmapped = train_and_evaluate(smoke_config(sharding__parallelism="pmap"), str(tmp_path / "pmap"))
  assert pmapped["eval"]["accuracy"] >= 0.0
  np.testing.assert_allclose(_train_losses(tmp_path / "pmap"), _train_losses(tmp_path / "jit"), rtol=2e-5)


def test_resume_from_a_middle_checkpoint_is_bit_identical(smoke_config, tmp_path):
  full = train_and_evaluate(smoke_config(), str(tmp_path / "full"))
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tmp_path / "full" / "checkpoints" / "3", resumed_dir / "checkpoints" / "3")
  resumed = train_and_evaluate(smoke_config(), str(resumed_dir))
  assert resumed["step"] == 6
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  # The resumed run only trained steps 4..6.
  np.testing.assert_array_equal(_train_losses(resumed_dir), _train_losses(tmp_path / "full")[3:])


def test_checkpoint_restores_onto_a_different_device_count(smoke_config, tmp_path):
  full = train_and_evaluate(smoke_config(sharding__fsdp=True), str(tmp_path / "full"))
  moved = tmp_path / "moved"
  shutil.copytree(tmp_path / "full" / "checkpoints" / "3", moved / "checkpoints" / "3")
  resumed = train_and_evaluate(smoke_config(sharding__num_devices=1), str(moved))
  assert resumed["state"].params["base"]["dense"]["kernel"].sharding.mesh.devices.size == 1
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_metrics_jsonl_and_tensorboard_events(smoke_config, tmp_path):
  result = train_and_evaluate(smoke_config(), str(tmp_path))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert rows[-1]["split"] == "eval" and rows[-1]["accuracy"] == pytest.approx(result["eval"]["accuracy"])
  (event_file,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "tensorboard") for f in fs]
  tags = set()
  with open(event_file, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      tags |= {v.tag for v in event.summary.value}
  assert {"train/loss", "train/accuracy", "eval/accuracy"} <= tags
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    assert json.load(f)["eval"] == result["eval"]


def test_quickstart_reaches_95_percent(smoke_config, tmp_path):
  config = smoke_config(
      num_train_steps=300,
      log_every=100,
      checkpoint__every_steps=300,
      model__cnn__features=(32, 64),
      model__cnn__hidden=128,
      optimizer__warmup_steps=50,
  )
  result = train_and_evaluate(config, str(tmp_path))
  assert result["eval"]["accuracy"] >= 0.95, result["eval"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(smoke_config, tmp_path, monkeypatch):
  original = input_pipeline.BatchLoader.batch

  def poisoned(self, step):
    batch = original(self, step)
    if step >= 3:  # the 4th step sees NaN inputs
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  monkeypatch.setattr(input_pipeline.BatchLoader, "batch", poisoned)
  with pytest.raises(NonFiniteLossError, match="at step 4"):
    train_and_evaluate(smoke_config(), str(tmp_path))
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  resumed = train_and_evaluate(smoke_config(), str(tmp_path))
  assert resumed["step"] == 6 and np.isfinite(resumed["params_l1"])


def test_unwritable_workdir_is_a_clear_error(smoke_config, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="is not a writable directory"):
    train_and_evaluate(smoke_config(), str(blocker / "run"))


def test_indivisible_batch_is_a_clear_error(smoke_config, tmp_path):
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the number of devices"):
    train_and_evaluate(smoke_config(batch_size=12), str(tmp_path))


def test_unknown_dataset_is_a_clear_error(smoke_config, tmp_path):
  with pytest.raises(ValueError, match="no_such_dataset"):
    train_and_evaluate(smoke_config(dataset__name="no_such_dataset"), str(tmp_path))


def test_checkpoint_of_another_model_is_refused_with_a_diff(smoke_config, tmp_path):
  train_and_evaluate(smoke_config(), str(tmp_path))
  with pytest.raises(IncompatibleCheckpointError, match="shape mismatch at params/base/dense/kernel"):
    train_and_evaluate(smoke_config(model__cnn__hidden=24), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


def _tensorboard_history(logdir):
  """(step, tag) pairs TensorBoard shows: a SessionLog START at step s hides earlier events of steps >= s."""
  shown = []
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      while header := f.read(12):
        (length,) = struct.unpack("<Q", header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
          shown = [(s, t) for s, t in shown if s < event.step]
        shown += [(event.step, v.tag) for v in event.summary.value]
  return shown


def test_resumed_history_reads_as_one_run_and_results_are_valid_json(smoke_config, tmp_path):
  train_and_evaluate(smoke_config(), str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if killed after logging step 6, before its save
  train_and_evaluate(smoke_config(), str(tmp_path))  # resumes at 3, replays 4..6
  train_and_evaluate(smoke_config(), str(tmp_path))  # a rerun of the finished run
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [(r["step"], r["split"]) for r in map(json.loads, f)]
  assert rows == [(s, "train") for s in range(1, 7)] + [(6, "eval")]
  shown = _tensorboard_history(tmp_path / "tensorboard")
  assert sorted(s for s, t in shown if t == "train/loss") == [1, 2, 3, 4, 5, 6]
  assert [s for s, t in shown if t == "eval/accuracy"] == [6]
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
  assert results["steps_per_sec"] is None  # no interval after compilation in a rerun


def test_huge_learning_rate_never_reaches_a_checkpoint(smoke_config, tmp_path):
  config = smoke_config(
      optimizer__learning_rate=1e39,
      optimizer__schedule="constant",
      optimizer__warmup_steps=0,
      checkpoint__every_steps=1,
  )
  with pytest.raises(NonFiniteLossError, match="Non-finite values in the updated state .* by step 1; not saved"):
    train_and_evaluate(config, str(tmp_path))
  assert [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()] == []


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"optimizer__learning_rate": -1e-3},
            "config.optimizer.learning_rate=-0.001: expected a positive finite number",
        ),
        ({"num_train_steps": -5}, "config.num_train_steps=-5: expected a positive integer"),
        ({"checkpoint__every_steps": 0}, "config.checkpoint.every_steps=0: expected a positive integer"),
        (
            {"sharding__parallelism": "pmap", "sharding__model_parallel": 2},
            "config.sharding.model_parallel=2 needs parallelism='jit'",
        ),
        ({"sharding__model_parallel": 3}, "config.sharding.model_parallel=3 does not divide the 8 devices"),
        (
            {"sharding__model_parallel": 2},
            "config.sharding.model_parallel=2: model CNN declares no tensor-parallel",
        ),
    ],
)
def test_nonsense_values_are_one_line_errors(smoke_config, tmp_path, override, message):
  with pytest.raises(UserError, match=re.escape(message)):
    train_and_evaluate(smoke_config(**override), str(tmp_path))


def test_second_run_on_a_busy_workdir_fails_at_once_and_a_killed_run_leaves_no_lock(smoke_config, tmp_path):
  holder = subprocess.Popen(
      [
          sys.executable,
          "-c",
          "import fcntl, os, time\n"  # another run's lock, without its imports
          f"f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
          "f.write(f'pid {os.getpid()} on here'); f.flush(); print('locked', flush=True); time.sleep(600)",
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError, match=f"is in use by another run \\(pid {holder.pid} "):
      train_and_evaluate(smoke_config(), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  with _workdir_lock(str(tmp_path)):  # SIGKILL released it
    pass


def test_disk_full_is_one_error_naming_the_workdir(smoke_config, tmp_path, monkeypatch):
  def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(Checkpointer, "save", full)
  with pytest.raises(DiskFullError, match=f"No space left on the device of --workdir={re.escape(str(tmp_path))}"):
    train_and_evaluate(smoke_config(), str(tmp_path))


def test_mlp_runs_with_the_quickstart_config(smoke_config, tmp_path):
  result = train_and_evaluate(smoke_config(model__name="mlp", export=False), str(tmp_path))
  assert set(result["state"].params["base"]) == {"dense_0", "head"}
