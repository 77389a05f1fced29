"""Fixtures for the harness tests: one prepared digits data dir per test session."""

import pytest

from configs import quickstart


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def smoke_config(data_dir):
  """The quickstart smoke config (6 steps, checkpoint every 3), pointed at the test data dir."""

  def make(**overrides):
    config = quickstart.get_config("smoke")
    config.dataset.data_dir = data_dir
    config.log_every = 1
    for dotted, value in overrides.items():
      node = config
      *parents, leaf = dotted.split("__")
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config

  return make
