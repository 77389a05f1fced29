"""The harness with adapters: pretrain, then adapt only a LoRA (+ head) starting from the export."""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from jaxpeft.adapters.checkpoint import load_adapter
from jaxpeft.adapters import reparam
from jaxpeft import merging
from jaxpeft.train import loop
from jaxpeft.train.loop import train_and_evaluate


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
  from configs import quickstart

  config = quickstart.get_config("smoke")
  config.dataset.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  train_and_evaluate(config, workdir)
  return os.path.join(workdir, "export", "params")


def _lora(smoke_config, pretrained, **overrides):
  return smoke_config(
      init_from__params=pretrained,
      trainable__base="head/.*",
      adapter__method="lora",
      adapter__targets="dense/kernel",
      adapter__rank=2,
      **overrides,
  )


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_lora_run_trains_only_adapter_and_head(smoke_config, pretrained, tmp_path):
  result = train_and_evaluate(_lora(smoke_config, pretrained), str(tmp_path))
  state = result["state"]
  assert sorted(_flat(state.params)) == [
      "adapter/dense/kernel/a",
      "adapter/dense/kernel/b",
      "base/head/bias",
      "base/head/kernel",
  ]
  base = _flat(ocp.StandardCheckpointer().restore(pretrained))
  for path, value in _flat(state.frozen).items():  # the frozen base is the pretrained one, untouched
    np.testing.assert_array_equal(value, base[path])
  d_in, d_out = base["dense/kernel"].shape
  assert result["trainable_params"] == 2 * (d_in + d_out) + base["head/kernel"].size + base["head/bias"].size
  # Numbered checkpoints hold no frozen params; the base is saved once.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6", "frozen"]
  # The adapter export restores in isolation and merges into the same weights as the export.
  adapter, config = load_adapter(str(tmp_path / "export" / "adapter.safetensors"))
  merged = _flat(ocp.StandardCheckpointer().restore(str(tmp_path / "export" / "params")))
  trained_base = traverse_util.unflatten_dict({**base, **_flat(state.params["base"])}, sep="/")
  rebuilt = _flat(reparam.merge(trained_base, adapter, config))
  for path in merged:
    np.testing.assert_allclose(merged[path], rebuilt[path], rtol=1e-6, atol=1e-7)
  # The adapter file is its float32 factors plus a small header, a fraction of the full export.
  adapter_floats = 2 * (d_in + d_out)
  assert 4 * adapter_floats < result["adapter_bytes"] < 4 * adapter_floats + 4096
  assert result["adapter_bytes"] < 0.2 * result["params_bytes"]


def test_lora_run_resumes_bit_identically(smoke_config, pretrained, tmp_path, monkeypatch):
  full = train_and_evaluate(_lora(smoke_config, pretrained), str(tmp_path / "full"))
  for item in ("3", "frozen"):
    shutil.copytree(tmp_path / "full" / "checkpoints" / item, tmp_path / "resumed" / "checkpoints" / item)
  shutil.copy(tmp_path / "full" / "base_checksum.txt", tmp_path / "resumed")  # recorded by the fresh start
  loads = []
  monkeypatch.setattr(loop, "load_params", lambda *args: loads.append(args))  # the base is not reloaded
  resumed = train_and_evaluate(_lora(smoke_config, pretrained), str(tmp_path / "resumed"))
  assert not loads
  for a, b in zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want = merging.base_checksum(ocp.StandardCheckpointer().restore(pretrained))
  for run in ("full", "resumed"):
    assert (tmp_path / run / "export" / "base_checksum.txt").read_text().strip() == want


def test_factored_mode_matches_reparam(smoke_config, pretrained, tmp_path):
  reparam_run = train_and_evaluate(_lora(smoke_config, pretrained), str(tmp_path / "reparam"))
  factored_run = train_and_evaluate(
      _lora(smoke_config, pretrained, adapter__mode="factored"), str(tmp_path / "factored")
  )
  for a, b in zip(jax.tree.leaves(reparam_run["state"].params), jax.tree.leaves(factored_run["state"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_pretrained_params_of_another_shape_are_refused(smoke_config, pretrained, tmp_path):
  with pytest.raises(ValueError, match="shape mismatch at dense/kernel"):
    train_and_evaluate(smoke_config(init_from__params=pretrained, model__cnn__hidden=24), str(tmp_path))
  # keep_fresh re-initialises the named leaves instead.
  result = train_and_evaluate(
      smoke_config(init_from__params=pretrained, model__num_classes=12, init_from__keep_fresh="head/.*"),
      str(tmp_path / "ok"),
  )
  assert result["state"].params["base"]["head"]["kernel"].shape[-1] == 12


def test_training_nothing_is_a_clear_error(smoke_config, tmp_path):
  with pytest.raises(ValueError, match="Nothing to train"):
    train_and_evaluate(smoke_config(trainable__base="no_such_leaf"), str(tmp_path))
