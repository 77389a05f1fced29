"""Optimistic-AMSGrad against a numpy transcription of its two-sequence update (float64).

There is no package to compare with: the authors' code (GitHub Hintonthu/optimistic-amsgrad) needs
an auxiliary network for its prediction. The transcription below keeps the paper's two sequences,
w_{t+1/2} and w_{t+1}, explicitly (the implementation folds them into one offset) and predicts the
next gradient by the regularized minimal polynomial extrapolation (RMPE) of past gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.optim.optimistic_amsgrad import _extrapolate, optimistic_amsgrad
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_low_precision_tracks_float64,
    assert_trajectories_close,
    random_problem,
    run_optax,
)

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 20
LR = 2.0**-6


def rmpe(history, lam):
  """Scieur et al.'s regularized extrapolation of x_1..x_k from the differences x_i - x_{i-1}."""
  x = np.stack([h.ravel() for h in history])
  u = np.diff(x, axis=0)
  z = np.linalg.solve(u @ u.T + lam * np.eye(len(u)), np.ones(len(u)))
  return ((z / z.sum()) @ x[1:]).reshape(history[-1].shape)


def numpy_optimistic_amsgrad(
    params, grads, lr=LR, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, span=5, lam=1e-3, schedule=None
):
  """Paper-form iteration: the gradient is taken at w_t; w_{t+1/2} is AMSGrad's sequence."""
  out = []
  for k, w0 in params.items():
    w, half = w0.copy(), w0.copy()
    theta, v, v_max, pred = (np.zeros_like(w0) for _ in range(4))
    seen = []
    trajectory = []
    for t, g_all in enumerate(grads, start=1):
      eta = float(schedule(t - 1)) if schedule else lr
      g = g_all[k] + weight_decay * w
      seen.append(g)
      next_pred = rmpe(seen[-(span + 1) :], lam) if len(seen) > span else np.zeros_like(g)
      h = b1 * theta + (1 - b1) * next_pred
      theta = b1 * theta + (1 - b1) * g
      v = b2 * v + (1 - b2) * (g - pred) ** 2
      v_max = np.maximum(v_max, v)
      alpha = eta * np.sqrt(1 - b2**t) / (1 - b1**t)
      denom = np.sqrt(v_max) + eps
      half = half - alpha * theta / denom
      w = half - alpha * h / denom
      pred = next_pred
      trajectory.append(w)
    out.append(trajectory)
  return [{k: out[i][s] for i, k in enumerate(params)} for s in range(len(grads))]


def _correlated_problem(seed=0):
  """Gradients that converge linearly plus noise, so the extrapolation has something to predict."""
  params, noise = random_problem(SHAPES, NUM_STEPS, seed=seed, grad_scale=0.1)
  rng = np.random.default_rng(seed + 1)
  limit = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  start = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  grads = [{k: limit[k] + 0.7**i * start[k] + noise[i][k] for k in SHAPES} for i in range(NUM_STEPS)]
  return params, grads


SETTINGS = {
    "defaults": {},
    "weight_decay": {"weight_decay": 0.1},
    "other": {"b1": 0.8, "b2": 0.999, "eps": 1e-3, "span": 2, "regularization": 1e-2},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_numpy_transcription(setting):
  kw = SETTINGS[setting]
  params, grads = _correlated_problem()
  ref_kw = {("lam" if k == "regularization" else k): v for k, v in kw.items()}
  expected = numpy_optimistic_amsgrad(params, grads, **ref_kw)
  assert_trajectories_close(
      run_optax(optimistic_amsgrad(LR, **kw), params, grads), expected, rtol=1e-9, atol=1e-12
  )


def test_schedule():
  params, grads = _correlated_problem(seed=3)
  expected = numpy_optimistic_amsgrad(params, grads, schedule=EXACT_SCHEDULE)
  ours = run_optax(optimistic_amsgrad(EXACT_SCHEDULE), params, grads)
  assert_trajectories_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_prediction_is_used():
  # Guards the transcription test: a zero-prediction AMSGrad (span never reached) leaves the trajectory.
  params, grads = _correlated_problem()
  ours = run_optax(optimistic_amsgrad(LR), params, grads)[-1]
  no_prediction = numpy_optimistic_amsgrad(params, grads, span=NUM_STEPS)[-1]
  assert max(np.abs(ours[k] - no_prediction[k]).max() for k in SHAPES) > 1e-3


def test_extrapolation_finds_limit_of_linear_sequence():
  # g_i = g* + rho1^i b1 + rho2^i b2: two modes are cancelled exactly by three differences (closed form).
  rng = np.random.default_rng(0)
  limit, d1, d2 = rng.normal(size=(3, 7))
  with jax.enable_x64(True):
    seq = [jnp.asarray(limit + 0.5**i * d1 + (-0.3) ** i * d2) for i in range(4)]
    np.testing.assert_allclose(_extrapolate(seq, 1e-12), limit, atol=1e-6)
    assert np.abs(seq[-1] - limit).max() > 1e-2


def test_low_precision_params():
  params, grads = _correlated_problem()
  assert_low_precision_tracks_float64(optimistic_amsgrad(LR), params, grads, jnp.float32, atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b1": 1.5}, "b1 must be in"),
        ({"span": 0}, "span must be an integer >= 1"),
        ({"regularization": 0.0}, "regularization must be > 0"),
        ({"learning_rate": -LR}, "learning_rate must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    optimistic_amsgrad(**{"learning_rate": LR, **kw})
