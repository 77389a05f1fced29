"""The vision recipes through the harness: a UNet trains on per-pixel labels; pretrain, then adapt from the export."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import digits_unet, digits_vit
from jaxpeft.train.loop import train_and_evaluate


def _smoke(module, method, data_dir, **overrides):
  config = module.get_config(method + ":smoke")
  config.dataset.data_dir = data_dir
  config.update(overrides)
  return config


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def unet_pretrained(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("unet_pretrain"))
  result = train_and_evaluate(_smoke(digits_unet, "pretrain", data_dir, num_train_steps=8), workdir)
  return workdir, result


def test_unet_trains_on_pixel_labels_and_its_loss_falls(unet_pretrained):
  workdir, result = unet_pretrained
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    losses = [row["loss"] for row in map(json.loads, f) if row["split"] == "train"]
  assert len(losses) == 8 and np.mean(losses[-2:]) < losses[0], losses
  assert 0.0 <= result["eval"]["mean_iou"] <= result["eval"]["accuracy"] <= 1.0, result["eval"]


def test_unet_cp_lora_adapts_from_the_pretrain_export(unet_pretrained, data_dir, tmp_path):
  export = os.path.join(unet_pretrained[0], "export", "params")
  config = _smoke(digits_unet, "cp_lora", data_dir)
  config.init_from.params = export
  result = train_and_evaluate(config, str(tmp_path))
  pretrained = _flat(ocp.StandardCheckpointer().restore(export))
  assert _flat(result["state"].params["base"]) == {}
  for path, value in _flat(result["state"].frozen).items():  # every base leaf is the pretrained one
    np.testing.assert_array_equal(value, pretrained[path])
  assert "mean_iou" in result["eval"] and result["adapter_bytes"] > 0


def test_vit_pretrains_on_some_classes_and_adapts_lora_to_others(data_dir, tmp_path):
  train_and_evaluate(_smoke(digits_vit, "pretrain", data_dir), str(tmp_path / "pretrain"))
  export = str(tmp_path / "pretrain" / "export" / "params")
  config = _smoke(digits_vit, "lora", data_dir)
  config.init_from.params = export
  result = train_and_evaluate(config, str(tmp_path / "lora"))
  pretrained = _flat(ocp.StandardCheckpointer().restore(export))
  trained = _flat(result["state"].params)
  assert sorted(p for p in trained if p.startswith("base/")) == ["base/head/bias", "base/head/kernel"]
  assert {p.rsplit("/", 2)[0] for p in trained if p.startswith("adapter/")} == {
      "adapter/block_0/attention/query",
      "adapter/block_0/attention/value",
  }
  for path, value in _flat(result["state"].frozen).items():
    np.testing.assert_array_equal(value, pretrained[path])
  # The head is re-initialised (keep_fresh), not the pretrained one.
  assert not np.allclose(np.asarray(trained["base/head/kernel"]), pretrained["head/kernel"])
  assert 0.0 <= result["eval"]["accuracy"] <= 1.0
