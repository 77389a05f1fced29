"""Tests for launch/config_overrides.py: None, open sections, type conversion, unknown keys."""

import pytest

from configs import digits_unet, minilm_text, quickstart
from launch.config_overrides import ConfigOverrideError, apply_overrides, split_argv


def _config(*overrides):
  config = quickstart.get_config("smoke")
  config.lock()  # as launch/train.py's config flag leaves it
  apply_overrides(config, [o.split("=", 1) for o in overrides])
  return config


def test_split_argv_keeps_the_other_flags():
  rest, overrides = split_argv(
      ["prog", "--config=configs/quickstart.py", "--config.optimizer.kwargs.rho=0.1", "--workdir=/tmp/x"]
  )
  assert rest == ["prog", "--config=configs/quickstart.py", "--workdir=/tmp/x"]
  assert overrides == [("optimizer.kwargs.rho", "0.1")]


def test_none_from_the_command_line():
  config = _config("optimizer.weight_decay=None", "optimizer.b1=0.8")
  assert config.optimizer.weight_decay is None and config.optimizer.b1 == 0.8


def test_any_factory_argument_goes_into_optimizer_kwargs():
  config = _config(
      "optimizer.name=sam",
      "optimizer.kwargs.rho=0.1",
      "optimizer.kwargs.adaptive=true",
      "optimizer.kwargs.base_optimizer=adamw",
  )
  assert config.optimizer.kwargs.to_dict() == {"rho": 0.1, "adaptive": True, "base_optimizer": "adamw"}


def test_values_take_the_field_type():
  config = _config(
      "optimizer.learning_rate=1",
      "model.cnn.features=16,32",
      "dataset.name=123",
      "adapter.fan_in_axes=(('conv.*', 3),)",
  )
  assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
  assert config.model.cnn.features == (16, 32)
  assert config.dataset.name == "123"
  assert config.adapter.fan_in_axes == (("conv.*", 3),)
  with pytest.raises(ConfigOverrideError, match="expected true or false"):
    _config("progress_bar=3")


def test_unknown_key_is_one_line_with_the_nearest_valid_keys():
  with pytest.raises(ConfigOverrideError) as error:
    _config("optimizer.learning_rte=0.1")
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
      "Unknown config key --config.optimizer.learning_rte; nearest valid keys: " "optimizer.learning_rate, "
  )
  with pytest.raises(ConfigOverrideError, match="nearest valid keys: adapter.rank"):
    _config("adaptr.rank=4")


@pytest.mark.parametrize(
    "get_config",
    [quickstart.get_config, minilm_text.get_config, digits_unet.get_config],
    ids=["quickstart", "minilm_text", "digits_unet"],
)
def test_every_config_has_every_adapter_knob_the_harness_reads(get_config):
  adapter = get_config().adapter
  for knob in (
      "method",
      "targets",
      "rank",
      "alpha",
      "options",
      "update",
      "penalty",
      "fan_in_axes",
      "rank_pattern",
      "alpha_pattern",
      "stacked_axes",
      "reselect_every",
      "calibration_batches",
      "mode",
      "init",
  ):
    assert knob in adapter, knob
