"""EXAdam against a float64 transcription of the author's official code and pytorch_optimizer."""

import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_optimizer

from jaxpeft.optim.exadam import exadam
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_follows_torch,
    assert_low_precision_tracks_float64,
    assert_schedule_and_injection_follow,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_torch,
)

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 2.0**-6

SETTINGS = {
    "defaults": {},
    "weight_decay": {"weight_decay": 0.1},
    "other_betas_eps": {"b1": 0.8, "b2": 0.99, "eps": 1e-3},
}


def official(params, grads, learning_rates, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
  """The official exadam.py's step, transcribed in numpy (float64); params after each step."""
  p = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  trajectory = []
  for step, (g, lr) in enumerate(zip(grads, learning_rates), start=1):
    for k in p:
      p[k] = p[k] - lr * weight_decay * p[k]
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      d1 = 1 + v[k] / (v[k] + eps) * b2**step
      d2 = 1 + m[k] ** 2 / (m[k] ** 2 + eps) * b1**step
      m_tilde = m[k] / (1 - b1**step) * d1
      v_tilde = v[k] / (1 - b2**step) * d2
      g_tilde = g[k] / (1 - b1**step) * d1
      p[k] = p[k] - lr * (m_tilde + g_tilde) / (np.sqrt(v_tilde) + eps)
    trajectory.append({k: x.copy() for k, x in p.items()})
  return trajectory


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_official_code(setting):
  kw = SETTINGS[setting]
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = official(params, grads, [LR] * NUM_STEPS, **kw)
  assert_trajectories_close(run_optax(exadam(LR, **kw), params, grads), ref)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_pytorch_optimizer(setting):
  kw = SETTINGS[setting]
  b1, b2 = kw.get("b1", 0.9), kw.get("b2", 0.999)
  others = {k: x for k, x in kw.items() if k not in ("b1", "b2")}
  make = lambda t: pytorch_optimizer.EXAdam(t, lr=LR, betas=(b1, b2), **others)
  assert_follows_torch(exadam(LR, **kw), make, SHAPES, NUM_STEPS)


def test_schedule_and_inject_hyperparams():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  lrs = [float(EXACT_SCHEDULE(i)) for i in range(NUM_STEPS)]
  ref = official(params, grads, lrs, weight_decay=0.1)
  assert_schedule_and_injection_follow(exadam, EXACT_SCHEDULE, params, grads, ref, weight_decay=0.1)
  # and pytorch_optimizer with the same schedule
  torch_ref = run_torch(
      lambda t: pytorch_optimizer.EXAdam(t, lr=LR, weight_decay=0.1), params, grads, schedule=EXACT_SCHEDULE
  )
  assert_trajectories_close(torch_ref, ref)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision(dtype, atol):
  params, grads = random_problem(SHAPES, 10)
  assert_low_precision_tracks_float64(exadam(LR), params, grads, dtype, atol)


def test_zero_gradients():
  params, grads = random_problem(SHAPES, NUM_STEPS, grad_scale=0.0)
  ours = run_optax(exadam(LR, weight_decay=0.1), params, grads)
  assert_trajectories_close(ours, official(params, grads, [LR] * NUM_STEPS, weight_decay=0.1))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b1": 1.0}, "b1 must be in"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    exadam(**{"learning_rate": LR, **kw})
