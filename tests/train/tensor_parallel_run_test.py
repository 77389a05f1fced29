"""Tensor parallelism through the harness (`config.sharding.model_parallel`): configs/gemma3_wordnet.py:lora:smoke
on 8 fake CPU devices as an 8x1 and a 2x4 `data` x `model` mesh (with a resume from one onto the other), and
as two `launch.train --multihost` processes; every run's losses equal the single-device run's."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import gemma3_wordnet
from jaxpeft.train.loop import train_and_evaluate
from launch.config_overrides import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4
# The smoke config with one layer and no generation (compile time), logged every step, saved every 2 steps.
OVERRIDES = {
    "model.architecture.num_hidden_layers": "1",
    "model.architecture.layer_types": "full_attention",
    "generation_examples": "0",
    "num_train_steps": str(STEPS),
    "checkpoint.every_steps": "2",
}


def _run(data_dir, workdir, **overrides):
  config = gemma3_wordnet.get_config("lora:smoke")
  config.lock()
  apply_overrides(config, [*OVERRIDES.items(), ("dataset.data_dir", data_dir), *overrides.items()])
  return train_and_evaluate(config, workdir)


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("single_device"))
  result = _run(data_dir, workdir, **{"sharding.num_devices": "1"})
  return _train_losses(workdir), result


def test_8x1_then_resumed_on_2x4_mesh_equals_the_single_device_run(reference, data_dir, tmp_path):
  losses, expected = reference
  workdir = str(tmp_path)
  fsdp_and_export = {"sharding.fsdp": "True", "export": "True"}
  _run(data_dir, workdir, num_train_steps="2", **fsdp_and_export)  # 8x1: data parallel, FSDP
  result = _run(data_dir, workdir, **{"sharding.model_parallel": "4"}, **fsdp_and_export)  # resumes at step 2
  np.testing.assert_allclose(_train_losses(workdir), losses, rtol=2e-5)
  np.testing.assert_allclose(result["eval"]["loss"], expected["eval"]["loss"], rtol=2e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), result["state"].params, expected["state"].params
  )
  state = result["state"]
  assert dict(state.frozen["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.mesh.shape) == {
      "data": 2,
      "model": 4,
  }
  q_proj = state.frozen["layers_0"]["self_attn"]["q_proj"]["kernel"]
  lora = state.params["adapter"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q_proj.sharding.spec == P("data", "model")  # column-parallel, FSDP over data
  assert lora["a"].sharding.spec == P("data", None) and lora["b"].sharding.spec == P(None, "model")
  assert q_proj.addressable_shards[0].data.shape == (32 // 2, 32 // 4)
  adam_mu = [
      leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
      if jax.tree_util.keystr(path).endswith("mu['adapter']['layers_0']['self_attn']['q_proj']['kernel']['b']")
  ]
  assert [m.sharding.spec for m in adam_mu] == [P(None, "model")]  # optimizer state follows its parameter
  assert os.path.isdir(os.path.join(workdir, "export", "params"))


def test_two_processes_with_model_parallel_2_equal_the_single_device_run(reference, data_dir, tmp_path):
  losses, expected = reference
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  workdir = str(tmp_path)
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "dataset.data_dir": data_dir}.items()]
  command = [
      sys.executable,
      "-m",
      "launch.train",
      "--config=configs/gemma3_wordnet.py:lora:smoke",
      f"--workdir={workdir}",
      *flags,
      "--config.sharding.model_parallel=2",  # a 2x2 mesh: data across the processes, model within each
      "--multihost",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
  ]
  procs = [
      subprocess.Popen(
          [*command, f"--process_id={i}"],
          cwd=ROOT,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  np.testing.assert_allclose(_train_losses(workdir), losses, rtol=2e-5)
  l1 = [float(out.split("params_l1=")[1].split(")")[0]) for out in outputs]
  assert l1[0] == l1[1]
  np.testing.assert_allclose(l1[0], expected["params_l1"], rtol=1e-5)
