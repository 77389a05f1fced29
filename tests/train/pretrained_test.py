"""Tests for jaxpeft/train/pretrained.py: `config.init_from.params` paths as users write them."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxpeft.train.errors import UserError
from jaxpeft.train.pretrained import load_params

FRESH = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}


def test_relative_export_path_loads(tmp_path, monkeypatch):
  saved = {"dense": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.ones(2)}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "workdir" / "export" / "params", saved)
  checkpointer.wait_until_finished()
  monkeypatch.chdir(tmp_path)
  loaded = load_params("workdir/export/params", FRESH)
  np.testing.assert_array_equal(loaded["dense"]["kernel"], np.arange(6.0).reshape(3, 2))


def test_missing_export_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(
      UserError, match=r"init_from.params='workdir/export/params': no such directory .*export/params"
  ):
    load_params("workdir/export/params", FRESH)


def test_directory_that_is_not_an_export_is_a_clear_error(tmp_path):
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  with pytest.raises(
      UserError, match=r"is not a params export \(no _METADATA in .*\). Point it at the export/params"
  ):
    load_params(str(tmp_path / "checkpoints" / "3"), FRESH)
