"""SaRA's full schedule in the harness: the nuclear-norm loss term and the progressive re-selection."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.state import TrainState
from jaxpeft.train.step import make_reselect_step, make_train_step
from jaxpeft.train.trainable import Trainable
from tests.train.saved_params import flat, save_initial_params

D_IN, CLASSES, TAU, LAMBDA = 12, 5, 0.3, 0.05


class _Linear(nn.Module):

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    return nn.Dense(CLASSES, name="layer")(x)


def _trainable(method="sara", options=None, **fields) -> Trainable:
  """SaRA (threshold TAU) on the linear layer's kernel, nothing else trained; `fields` set `config.adapter`."""
  adapter = common.adapter(method, "layer/kernel")
  adapter.options = ml_collections.ConfigDict({"threshold": TAU} if options is None else options)
  for key, value in fields.items():
    adapter[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return Trainable.from_config(
      _Linear(), ml_collections.ConfigDict({"trainable": {"base": ""}, "adapter": adapter})
  )


def _setup(trainable, tx):
  rng = np.random.default_rng(0)
  batch = {
      "x": jnp.asarray(rng.normal(size=(8, D_IN)), jnp.float32),
      "label": jnp.asarray(rng.integers(0, CLASSES, size=8), jnp.int32),
  }
  base = _Linear().init(jax.random.key(1), batch["x"])["params"]
  params, frozen = trainable.split(jax.random.key(0), base)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params), rng=jax.random.key(2)
  )
  return state, batch


def _sara(tree):
  return tree["adapter"]["layer"]["kernel"]


def test_nuclear_norm_is_in_the_loss_and_its_gradient_in_the_update():
  on = _trainable(penalty={"lambda_rank": LAMBDA, "min_dim": 2})
  off = _trainable()
  tx = on.optimizer(optax.sgd(1.0))
  state, batch = _setup(on, tx)
  delta = jnp.asarray(np.random.default_rng(1).normal(size=(D_IN, CLASSES)) * 0.1, jnp.float32)
  state = state.replace(
      params={**state.params, "adapter": {"layer": {"kernel": {**_sara(state.params), "delta": delta}}}}
  )
  new_on, metrics_on = jax.jit(make_train_step(on, tx, ("x",)))(state, batch)
  new_off, metrics_off = jax.jit(make_train_step(off, tx, ("x",)))(state, batch)

  mask = np.asarray(_sara(state.params)["mask"], np.float64)
  assert 0 < mask.sum() < mask.size
  masked = mask * (np.asarray(state.frozen["layer"]["kernel"], np.float64) + mask * np.asarray(delta, np.float64))
  u, s, vt = np.linalg.svd(masked, full_matrices=False)
  np.testing.assert_allclose(metrics_on["penalty"], LAMBDA * s.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics_on["loss"], metrics_off["loss"] + LAMBDA * s.sum(), rtol=1e-5)
  assert "penalty" not in metrics_off
  # SGD(1): the difference of the updates is -lambda times the subgradient M * U V^T.
  np.testing.assert_allclose(
      _sara(new_on.params)["delta"] - _sara(new_off.params)["delta"], -LAMBDA * mask * (u @ vt), atol=1e-5
  )


def test_reselect_merges_redraws_the_mask_and_restarts_the_optimizer_but_not_the_schedule():
  trainable = _trainable(reselect_every=3)
  tx = trainable.optimizer(optax.adamw(optax.cosine_decay_schedule(0.1, 100), weight_decay=0.0))
  state, batch = _setup(trainable, tx)
  step = jax.jit(make_train_step(trainable, tx, ("x",)))
  for _ in range(3):
    state, _ = step(state, batch)
  assert trainable.reselects_after(3) and not trainable.reselects_after(2)
  new = jax.jit(make_reselect_step(trainable, tx))(state)

  old_mask, delta = (np.asarray(_sara(state.params)[k], np.float64) for k in ("mask", "delta"))
  merged = np.asarray(state.frozen["layer"]["kernel"], np.float64) + old_mask * delta
  new_kernel = np.asarray(new.frozen["layer"]["kernel"])
  np.testing.assert_allclose(new_kernel, merged, rtol=1e-6, atol=1e-7)
  new_mask = np.asarray(_sara(new.params)["mask"])
  np.testing.assert_array_equal(new_mask, np.abs(new_kernel) < TAU)  # redrawn on the merged weights
  assert np.any(new_mask != old_mask)
  np.testing.assert_array_equal(_sara(new.params)["delta"], 0.0)
  assert trainable.num_trained(new.params) == new_mask.sum()
  x = [batch["x"]]
  np.testing.assert_allclose(
      trainable.apply(new.params, new.frozen, x, train=False),
      trainable.apply(state.params, state.frozen, x, train=False),
      rtol=1e-5,
      atol=1e-6,
  )

  def states(opt_state, kind):
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
    return [s for s in nodes if isinstance(s, kind)]

  (adam_before,) = states(state.opt_state, optax.ScaleByAdamState)
  (adam,) = states(new.opt_state, optax.ScaleByAdamState)
  assert int(adam_before.count) == 3 and int(adam.count) == 0
  assert any(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(adam_before.mu))
  for moment in jax.tree.leaves((adam.mu, adam.nu)):
    np.testing.assert_array_equal(moment, 0.0)
  (schedule,) = states(new.opt_state, optax.ScaleByScheduleState)
  assert int(schedule.count) == 3  # the learning rate continues from step 3


def test_schedule_options_of_other_methods_are_errors():
  with pytest.raises(ValueError, match="no re-selection"):
    _trainable(method="lora", options={}, reselect_every=5)
  with pytest.raises(ValueError, match="no loss term"):
    _trainable(method="lora", options={}, penalty={"lambda_rank": 1e-3})
  with pytest.raises(ValueError, match="lambda_rank"):
    _trainable(penalty={"lambda": 1e-3})


@pytest.fixture(scope="module")
def start(tmp_path_factory, data_dir):
  from configs import quickstart

  config = quickstart.get_config("smoke")
  config.dataset.data_dir = data_dir
  path = str(tmp_path_factory.mktemp("start") / "params")
  return path, save_initial_params(config, path)


RUN_TAU = 0.02  # about a third of the CNN's dense kernel (std 1/sqrt(512))


def _run_config(smoke_config, path, **overrides):
  config = smoke_config(
      init_from__params=path,
      trainable__base="head/.*",
      adapter__method="sara",
      adapter__targets="dense/kernel",
      adapter__reselect_every=2,
      optimizer__learning_rate=1e-2,
      **overrides,
  )
  config.adapter.options.threshold = RUN_TAU
  config.adapter.penalty.lambda_rank = 1e-3
  config.adapter.penalty.min_dim = 8
  return config


def test_sara_run_reselects_penalises_and_resumes(start, smoke_config, tmp_path):
  path, original = start
  full = train_and_evaluate(_run_config(smoke_config, path), str(tmp_path / "full"))
  params, frozen = flat(full["state"].params), flat(full["state"].frozen)
  # Re-selected after steps 2 and 4: the base holds the merged rounds, the mask is drawn on it.
  assert np.abs(frozen["dense/kernel"] - original["dense/kernel"]).max() > 1e-4
  mask = params["adapter/dense/kernel/mask"]
  np.testing.assert_array_equal(mask, np.abs(frozen["dense/kernel"]) < RUN_TAU)
  assert np.any(mask != (np.abs(original["dense/kernel"]) < RUN_TAU))
  assert full["trainable_params"] == mask.sum() + original["head/kernel"].size + original["head/bias"].size
  with open(tmp_path / "full" / "metrics.jsonl", encoding="utf-8") as f:
    train_rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert len(train_rows) == 6 and all(r["penalty"] > 0 for r in train_rows)
  # The base changes during the run, so every checkpoint holds it (no separate frozen/ item).
  assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["3", "6"]

  shutil.copytree(tmp_path / "full" / "checkpoints" / "3", tmp_path / "resumed" / "checkpoints" / "3")
  resumed = train_and_evaluate(_run_config(smoke_config, path), str(tmp_path / "resumed"))
  for tree in ("params", "frozen"):
    expect, got = flat(getattr(full["state"], tree)), flat(getattr(resumed["state"], tree))
    assert sorted(expect) == sorted(got)
    for leaf in expect:
      np.testing.assert_array_equal(got[leaf], expect[leaf])
