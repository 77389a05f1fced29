"""launch/merge.py end to end on tiny runs: a pretraining run, two LoRA fine-tunes of it, merged both ways."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch

from configs import merge_models, quickstart
from jaxpeft import merging
from jaxpeft.adapters import reparam
from jaxpeft.adapters.checkpoint import load_adapter
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.merge_exports import merge_workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """``(pretrained export/params, [two fine-tune workdirs])``: LoRA on dense/kernel, different seeds."""
  config = quickstart.get_config("smoke")
  config.dataset.data_dir = data_dir
  pretrain = str(tmp_path_factory.mktemp("pretrain"))
  train_and_evaluate(config, pretrain)
  pretrained = os.path.join(pretrain, "export", "params")
  workdirs = []
  for seed in (1, 2):
    config = quickstart.get_config("smoke")
    config.dataset.data_dir = data_dir
    config.seed, config.init_from.params, config.trainable.base = seed, pretrained, ""
    config.adapter.method, config.adapter.targets, config.adapter.rank = "lora", "dense/kernel", 2
    workdirs.append(str(tmp_path_factory.mktemp(f"lora_{seed}")))
    train_and_evaluate(config, workdirs[-1])
  return pretrained, workdirs


def _restore(path):
  return ocp.StandardCheckpointer().restore(path)


def test_full_models_merge_with_ties_through_the_cli(runs, tmp_path):
  pretrained, workdirs = runs
  out = tmp_path / "merged"
  subprocess.run(
      [
          sys.executable,
          "-m",
          "launch.merge",
          "--config=configs/merge_models.py:ties",
          f"--workdir={out}",
          f"--config.inputs={','.join(workdirs)}",
          f"--config.base={pretrained}",
          "--config.density=0.5",
          "--config.weights=(0.6,0.4)",
      ],
      cwd=ROOT,
      check=True,
      timeout=300,
  )
  summary = json.loads((out / "merge_summary.json").read_text())
  assert summary["method"] == "ties" and summary["base_checked"] == sorted(workdirs)
  base = _restore(pretrained)
  want = merging.ties(base, [_restore(os.path.join(w, "export", "params")) for w in workdirs], [0.6, 0.4], 0.5)
  got = _restore(str(out / "export" / "params"))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert not np.allclose(got["dense"]["kernel"], base["dense"]["kernel"])


def test_adapters_merge_into_one_lora_adapter(runs, tmp_path):
  pretrained, workdirs = runs
  config = merge_models.get_config("adapter_linear")
  config.inputs, config.base, config.weights = ",".join(workdirs), pretrained, (0.5, 0.5)
  summary = merge_workdirs(config, str(tmp_path), show_progress=False)
  assert summary["adapter_ranks"] == {"dense/kernel": 4}  # exact concatenation: ranks add up
  base = _restore(pretrained)
  adapter, adapter_config = load_adapter(tmp_path / "export" / "adapter.safetensors", base_params=base)
  delta = sum(
      0.5
      * (np.asarray(_restore(os.path.join(w, "export", "params"))["dense"]["kernel"]) - base["dense"]["kernel"])
      for w in workdirs
  )
  np.testing.assert_allclose(
      reparam.merge(base, adapter, adapter_config)["dense"]["kernel"], base["dense"]["kernel"] + delta, atol=1e-5
  )
  np.testing.assert_allclose(
      _restore(str(tmp_path / "export" / "params"))["dense"]["kernel"], base["dense"]["kernel"] + delta, atol=1e-5
  )
  # export/peft is PEFT's layout: PeftModel loads it onto a torch Linear holding the base weights, and the
  # adapted layer computes x @ (W_0 + Σ_i w_i ΔW_i) + b, the merged model's dense layer
  assert summary["peft_dir"] == str(tmp_path / "export" / "peft")
  assert sorted(os.listdir(summary["peft_dir"])) == ["adapter_config.json", "adapter_model.safetensors"]
  kernel, bias = np.asarray(base["dense"]["kernel"]), np.asarray(base["dense"]["bias"])
  torch_model = torch.nn.Sequential()
  torch_model.add_module("dense", torch.nn.Linear(*kernel.shape))
  with torch.no_grad():
    torch_model.dense.weight.copy_(torch.tensor(kernel.T))
    torch_model.dense.bias.copy_(torch.tensor(bias))
  peft_model = peft.PeftModel.from_pretrained(torch_model, summary["peft_dir"])
  x = np.random.default_rng(0).normal(size=(4, kernel.shape[0])).astype(np.float32)
  with torch.no_grad():
    got = peft_model(torch.tensor(x)).numpy()
  np.testing.assert_allclose(got, x @ (kernel + delta) + bias, atol=1e-4)


def test_a_run_of_another_base_is_refused(runs, tmp_path):
  pretrained, workdirs = runs
  other = tmp_path / "other_base" / "export"
  other.mkdir(parents=True)
  base = jax.tree.map(lambda x: x + 1.0, _restore(pretrained))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(other / "params"), base)
  checkpointer.wait_until_finished()
  config = merge_models.get_config("task_arithmetic")
  config.inputs, config.base = ",".join(workdirs), str(other / "params")
  with pytest.raises(ValueError, match="were fine-tuned from a different base"):
    merge_workdirs(config, str(tmp_path / "out"), show_progress=False)
