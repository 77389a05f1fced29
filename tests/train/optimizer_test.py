"""Tests for jaxpeft/train/optimizer.py: optimizers built by name from the config."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
