"""`config.sharding.steps_per_call`: K steps per compiled call train exactly as one step per call."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from jaxpeft.train.errors import UserError
from jaxpeft.train.loop import train_and_evaluate


def _train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def _params(result):
  return [np.asarray(x) for x in jax.tree.leaves(result["state"].params)]


def test_two_steps_per_call_equal_one_and_resume_bit_identically(smoke_config, tmp_path):
  config = lambda k: smoke_config(sharding__steps_per_call=k, checkpoint__every_steps=2, log_every=2, export=False)
  one = train_and_evaluate(config(1), str(tmp_path / "one"))
  two = train_and_evaluate(config(2), str(tmp_path / "two"))
  assert two["step"] == 6
  for a, b in zip(_params(one), _params(two)):
    np.testing.assert_array_equal(a, b)
  assert _train_rows(tmp_path / "two") == _train_rows(tmp_path / "one")

  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tmp_path / "two" / "checkpoints" / "4", resumed_dir / "checkpoints" / "4")
  resumed = train_and_evaluate(config(2), str(resumed_dir))
  for a, b in zip(_params(two), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  assert _train_rows(resumed_dir) == _train_rows(tmp_path / "two")[-1:]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"log_every": 3}, "config.log_every=3 is not a multiple of config.sharding.steps_per_call=2"),
        ({"checkpoint__every_steps": 3}, "config.checkpoint.every_steps=3 is not a multiple of"),
        ({"sharding__parallelism": "pmap"}, "config.sharding.steps_per_call=2 needs parallelism='jit'"),
    ],
)
def test_intervals_that_are_not_multiples_are_one_line_errors(smoke_config, tmp_path, override, message):
  with pytest.raises(UserError, match=re.escape(message)):
    valid = {"sharding__steps_per_call": 2, "log_every": 2, "checkpoint__every_steps": 2}
    train_and_evaluate(smoke_config(**{**valid, **override}), str(tmp_path))
