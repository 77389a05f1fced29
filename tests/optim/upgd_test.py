"""UPGD against a float64 transcription of the authors' README class (noise checked separately)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.optim.upgd import upgd
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_schedule_and_injection_follow,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_optax_in_dtype,
)

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 2.0**-6

SETTINGS = {
    "defaults": {},
    "no_decay_fast_utility": {"weight_decay": 0.0, "beta_utility": 0.5},
    "no_ema": {"beta_utility": 0.0, "weight_decay": 0.1},
}


def sigmoid(x):
  return 0.5 * (1 + np.tanh(x / 2))


def authors(params, grads, learning_rates, beta_utility=0.999, weight_decay=1e-3):
  """The authors' UPGD step with sigma=0 (their README class), in numpy float64."""
  p = {k: v.copy() for k, v in params.items()}
  u = {k: np.zeros_like(v) for k, v in params.items()}
  trajectory = []
  for step, (g, lr) in enumerate(zip(grads, learning_rates), start=1):
    global_max = -np.inf
    for k in p:
      u[k] = beta_utility * u[k] + (1 - beta_utility) * (-g[k] * p[k])
      global_max = max(global_max, u[k].max())
    for k in p:
      scaled = sigmoid(u[k] / (1 - beta_utility**step) / global_max)
      p[k] = p[k] * (1 - lr * weight_decay) - 2 * lr * g[k] * (1 - scaled)
    trajectory.append({k: x.copy() for k, x in p.items()})
  return trajectory


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_authors_without_noise(setting):
  kw = SETTINGS[setting]
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = authors(params, grads, [LR] * NUM_STEPS, **kw)
  assert_trajectories_close(run_optax(upgd(LR, sigma=0.0, **kw), params, grads), ref)


def test_schedule_and_inject_hyperparams():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  lrs = [float(EXACT_SCHEDULE(i)) for i in range(NUM_STEPS)]
  ref = authors(params, grads, lrs, weight_decay=0.1)
  assert_schedule_and_injection_follow(upgd, EXACT_SCHEDULE, params, grads, ref, sigma=0.0, weight_decay=0.1)


def test_noise_is_gated_by_utility():
  """Zero gradients: the step is pure noise, 2 lr sigma xi (1 - s) with s = sigmoid(1) on the
  single most useful weight and sigmoid(u/max) elsewhere; check its scale on many weights."""
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(200, 100))}
  grads = [{"w": -params["w"]}, {"w": np.zeros((200, 100))}]  # step 1 sets u = (1-b) w^2 >= 0
  sigma, beta = 0.5, 0.9
  with jax.enable_x64(True):
    tx = upgd(1.0, beta_utility=beta, sigma=sigma, weight_decay=0.0)
    p1, _, _ = run_optax_in_dtype(tx, params, grads[:1], jnp.float64)
    p2, _, _ = run_optax_in_dtype(tx, params, grads, jnp.float64)
  # Step 2 alone (same key sequence: p2's second step): u_2 = beta u_1, max taken before correction.
  u2 = beta * (1 - beta) * params["w"] ** 2
  scaled = sigmoid(u2 / (1 - beta**2) / u2.max())
  xi = -(np.asarray(p2["w"]) - np.asarray(p1["w"])) / (2 * sigma * (1 - scaled))
  assert abs(xi.mean()) < 0.02 and abs(xi.std() - 1.0) < 0.02


def test_zero_utility_with_zero_maximum_is_neutral_not_nan():
  # All utilities -g * w <= 0 and the zero bias's = 0: the authors' 0/0 would give NaN.
  params = {"w": np.ones((2, 3)), "bias": np.zeros(3)}
  grads = [{"w": np.ones((2, 3)), "bias": np.ones(3)}]
  (p,) = run_optax(upgd(LR, sigma=0.0, weight_decay=0.0), params, grads)
  np.testing.assert_allclose(p["bias"], -2 * LR * 0.5 * np.ones(3))  # s = sigmoid(0) = 1/2
  np.testing.assert_allclose(p["w"], (1 - 2 * LR) * np.ones((2, 3)))  # u / 0 = -inf: s = 0, full step


def test_needs_params():
  tx = upgd()
  tree = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(tree, tx.init(tree))


@pytest.mark.parametrize(
    "kw, match", [({"beta_utility": 1.0}, "beta_utility must be in"), ({"sigma": -1.0}, "sigma must be >= 0")]
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    upgd(**kw)
