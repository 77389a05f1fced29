"""Tests for jaxpeft/train/optimizer.py: optimizers built by name from the config."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft.optim
from configs import quickstart
from jaxpeft.train.optimizer import build_optimizer, learning_rate_schedule


def _opt_config(**overrides):
  config = quickstart.get_config().optimizer
  config.unlock()
  config.update(overrides)
  return config


def test_adamw_from_config_matches_optax_adamw():
  config = _opt_config(schedule="constant", warmup_steps=0, weight_decay=0.01, b2=0.99)
  tx = build_optimizer(config, total_steps=10)
  ref = optax.adamw(config.learning_rate, b2=0.99, weight_decay=0.01)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  grads = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-6)


def test_cosine_schedule_closed_form():
  config = _opt_config(schedule="cosine", warmup_steps=10, learning_rate=0.5)
  schedule = learning_rate_schedule(config, total_steps=110)
  np.testing.assert_allclose(schedule(5), 0.25, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.5 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-7)


def test_unknown_optimizer_names_the_choices():
  with pytest.raises(ValueError, match="Unknown optimizer 'adamx'"):
    build_optimizer(_opt_config(name="adamx"), total_steps=10)


def test_hyperparameter_the_optimizer_lacks_is_an_error():
  with pytest.raises(ValueError, match="has no 'b3' argument"):
    build_optimizer(_opt_config(name="adamw", b3=0.9), total_steps=10)


def test_bad_schedule_is_an_error():
  with pytest.raises(ValueError, match="schedule='linear'"):
    build_optimizer(_opt_config(schedule="linear"), total_steps=10)


def _factory_names():
  """Every jaxpeft.optim factory taking a learning rate, plus the optax names the README uses."""
  ours = [
      n
      for n in jaxpeft.optim.__all__
      if callable(getattr(jaxpeft.optim, n))
      and not n.startswith("scale_by")
      and "learning_rate" in inspect.signature(getattr(jaxpeft.optim, n)).parameters
  ]
  assert {"sam", "tram", "came", "adopt"} <= set(ours), ours
  return ours + ["adam", "adamw", "sgd", "adafactor"]


def _one_update(tx, params):
  """One update with every extra argument the harness's train step passes."""
  tx = optax.with_extra_args_support(tx)
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"])
  grads = jax.grad(loss)(params)
  distance = lambda p, ref: sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)))
  updates, _ = tx.update(
      grads,
      tx.init(params),
      params,
      value=loss(params),
      obj_fn=loss,
      grad_fn=jax.grad(loss),
      trust_region_fn=distance,
      key=jax.random.key(0),
  )
  return updates


@pytest.mark.parametrize("name", _factory_names())
def test_every_optimizer_name_works_with_the_quickstart_config_as_is(name):
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
  updates = _one_update(build_optimizer(_opt_config(name=name, warmup_steps=0), total_steps=10), params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))


def test_kwargs_and_base_optimizer_by_name_reach_sam():
  config = _opt_config(name="sam", schedule="constant", warmup_steps=0, weight_decay=0.01, b2=0.99)
  config.kwargs = {"rho": 0.3, "adaptive": True, "base_optimizer": "adamw"}
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
  ref = jaxpeft.optim.sam(
      rho=0.3, adaptive=True, base_optimizer=optax.adamw(config.learning_rate, b2=0.99, weight_decay=0.01)
  )
  np.testing.assert_allclose(
      _one_update(build_optimizer(config, 10), params)["w"], _one_update(ref, params)["w"], rtol=1e-6
  )


def test_unknown_factory_argument_lists_the_ones_it_takes():
  config = _opt_config(name="sam")
  config.kwargs = {"rhoo": 0.1}
  with pytest.raises(
      ValueError,
      match=r"kwargs.rhoo=0.1 is set, but optimizer 'sam' has no 'rhoo' argument\. "
      r"It takes: rho, adaptive, eta, eps, base_optimizer, axis_name",
  ):
    build_optimizer(config, total_steps=10)


def test_a_new_jaxpeft_factory_is_usable_by_name_with_all_its_arguments(monkeypatch):
  seen = {}

  def newopt(learning_rate, gamma=1.0, *, weight_decay=0.0):
    seen.update(gamma=gamma, weight_decay=weight_decay)
    return optax.sgd(learning_rate)

  monkeypatch.setattr(jaxpeft.optim, "newopt", newopt, raising=False)
  config = _opt_config(name="newopt", weight_decay=0.5)
  config.kwargs = {"gamma": 3.0}
  build_optimizer(config, total_steps=10)
  assert seen == {"gamma": 3.0, "weight_decay": 0.5}


def test_weight_decay_without_a_factory_argument_is_l2_on_the_gradient():
  config = _opt_config(name="sgd", schedule="constant", warmup_steps=0, learning_rate=0.1, weight_decay=0.5)
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
  grads = {"w": jnp.array([0.5, 0.5]), "b": jnp.array([1.0])}
  tx = build_optimizer(config, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * (np.array([0.5, 0.5]) + 0.5 * np.array([1.0, -2.0])), rtol=1e-6)


def test_weight_decay_none_keeps_the_factory_default():
  config = _opt_config(name="adafactor", weight_decay=None, schedule="constant", warmup_steps=0)
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
  np.testing.assert_allclose(
      _one_update(build_optimizer(config, 10), params)["w"],
      _one_update(optax.adafactor(config.learning_rate), params)["w"],
      rtol=1e-6,
  )
