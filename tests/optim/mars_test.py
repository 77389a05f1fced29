"""MARS (AdamW and Lion forms) against a float64 transcription of the authors' code and pytorch_optimizer."""

import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_optimizer

from jaxpeft.optim.mars import mars
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_follows_torch,
    assert_low_precision_tracks_float64,
    assert_schedule_and_injection_follow,
    assert_trajectories_close,
    random_problem,
    run_optax,
)

# A vector, two matrices (one with a large gradient norm, so the correction is clipped) and a conv kernel.
SHAPES = {"bias": (5,), "kernel": (4, 3), "wide": (6, 8), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 2.0**-6
LR_1D = 2.0**-7

SETTINGS = {
    "adamw": {},
    "lion": {"mars_type": "lion"},
    "weight_decay": {"weight_decay": 0.1, "weight_decay_1d": 0.05},
    "optimize_1d": {"optimize_1d": True, "weight_decay": 0.1},
    "lion_optimize_1d": {"mars_type": "lion", "optimize_1d": True},
    "other_hyperparameters": {"b1": 0.9, "b2": 0.999, "gamma": 0.5, "eps": 1e-3, "b1_1d": 0.8, "b2_1d": 0.9},
}


def authors(
    params,
    grads,
    learning_rates,
    b1=0.95,
    b2=0.99,
    gamma=0.025,
    eps=1e-8,
    weight_decay=0.0,
    b1_1d=0.9,
    b2_1d=0.95,
    weight_decay_1d=0.1,
    mars_type="adamw",
    optimize_1d=False,
    lr_1d=LR_1D,
):
  """The authors' MARS step (approximate mode), transcribed in numpy (float64); params after each step.

  `learning_rates` is the lr at each step; the non-matrix lr is lr * lr_1d / lr_0 as in their code.
  """
  p = {k: v.copy() for k, v in params.items()}
  m, v, last = ({k: np.zeros_like(x) for k, x in params.items()} for _ in range(3))
  lr_1d_factor = lr_1d / learning_rates[0]
  trajectory = []
  for step, (g, lr) in enumerate(zip(grads, learning_rates), start=1):
    for k in p:
      is_2d = g[k].ndim == 2
      if optimize_1d or is_2d:
        c = (g[k] - last[k]) * (gamma * (b1 / (1 - b1))) + g[k]
        norm = np.linalg.norm(c)
        if norm > 1:
          c = c / norm
        m[k] = b1 * m[k] + (1 - b1) * c
        if mars_type == "adamw" or not is_2d:
          v[k] = b2 * v[k] + (1 - b2) * c * c
          denom = (np.sqrt(v[k]) / np.sqrt(1 - b2**step) + eps) * (1 - b1**step)
          u = m[k] / denom
        else:
          u = np.sign(m[k])
        wd = weight_decay
        p[k] = p[k] - lr * (wd * p[k] + u)
      else:
        m[k] = b1_1d * m[k] + (1 - b1_1d) * g[k]
        v[k] = b2_1d * v[k] + (1 - b2_1d) * g[k] ** 2
        denom = (np.sqrt(v[k]) / np.sqrt(1 - b2_1d**step) + eps) * (1 - b1_1d**step)
        p[k] = p[k] - lr * lr_1d_factor * (weight_decay_1d * p[k] + m[k] / denom)
      last[k] = g[k]
    trajectory.append({k: x.copy() for k, x in p.items()})
  return trajectory


def problem():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  for g in grads:
    g["wide"] = 3.0 * g["wide"]  # norm ~ 20: the corrected gradient is clipped to norm 1
  return params, grads


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_authors_code(setting):
  kw = SETTINGS[setting]
  params, grads = problem()
  ours = run_optax(mars(LR, lr_1d=LR_1D, **kw), params, grads)
  assert_trajectories_close(ours, authors(params, grads, [LR] * NUM_STEPS, **kw))


def test_lion_differs_from_adamw():
  params, grads = problem()
  lion = run_optax(mars(LR, lr_1d=LR_1D, mars_type="lion"), params, grads)
  # At step 1 the bias-corrected AdamW step is sign(c_1) (up to eps), so the forms part at step 2.
  with pytest.raises(AssertionError, match="diverges at step 2"):
    assert_trajectories_close(lion, authors(params, grads, [LR] * NUM_STEPS))


@pytest.mark.parametrize("setting", ["adamw", "lion", "weight_decay", "optimize_1d"])
def test_matches_pytorch_optimizer(setting):
  # pytorch_optimizer puts eps before the bias correction (eps=0 removes that difference) and
  # treats conv kernels as matrices (the authors do not): without the conv kernel, or with
  # optimize_1d, the two coincide.
  kw = {**SETTINGS[setting], "eps": 0.0}
  shapes = {k: s for k, s in SHAPES.items() if k != "conv" or kw.get("optimize_1d")}
  make = lambda t: pytorch_optimizer.MARS(t, lr=LR, lr_1d=LR_1D, **{k: x for k, x in kw.items()})
  assert_follows_torch(mars(LR, lr_1d=LR_1D, **kw), make, shapes, NUM_STEPS)


def test_schedule_and_inject_hyperparams():
  kw = {"weight_decay": 0.1}
  params, grads = problem()
  lrs = [float(EXACT_SCHEDULE(i)) for i in range(NUM_STEPS)]
  ref = authors(params, grads, lrs, **kw)
  lr_1d = lambda count: LR_1D * EXACT_SCHEDULE(count) / LR
  assert_schedule_and_injection_follow(mars, EXACT_SCHEDULE, params, grads, ref, lr_1d=lr_1d, **kw)


# bfloat16's spacing near |theta| = 2 is 2**-6 = LR, and MARS's steps are ~LR per coordinate, so each of
# the 10 steps may round by up to half a step.
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 6e-2)])
def test_low_precision(dtype, atol):
  params, grads = random_problem(SHAPES, 10)
  assert_low_precision_tracks_float64(mars(LR, weight_decay=0.1), params, grads, dtype, atol)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b1": 1.0}, "b1 must be in"),
        ({"b2_1d": -0.1}, "b2_1d must be in"),
        ({"gamma": -1.0}, "gamma must be >= 0"),
        ({"lr_1d": -1.0}, "lr_1d must be >= 0"),
        ({"mars_type": "shampoo"}, "mars_type must be 'adamw' or 'lion'"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    mars(**{"learning_rate": LR, **kw})
