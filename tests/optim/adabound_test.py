"""AdaBound and AMSBound against the authors' adabound package and pytorch_optimizer."""

import adabound as adabound_authors
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_optimizer

from jaxpeft.optim.adabound import adabound
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_follows_torch,
    assert_low_precision_follows_torch,
    assert_schedule_follows_torch,
    random_problem,
    run_optax,
)

# The authors' package uses torch's deprecated add_(scalar, tensor) overload.
pytestmark = pytest.mark.filterwarnings("ignore:This overload of add_:UserWarning")

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 2.0**-6  # EXACT_SCHEDULE's initial value, so that schedule(t) / LR is exact

SETTINGS = {
    "defaults": {},
    # gamma=0.1 closes the band within the run, so the clipping is exercised from both sides.
    "fast_bounds": {"gamma": 0.1, "final_lr": 0.05},
    "weight_decay": {"weight_decay": 0.1, "gamma": 0.1},
    "amsbound": {"amsbound": True, "gamma": 0.1},
    "other_betas_eps": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "gamma": 0.05},
}


def authors(b1=0.9, b2=0.999, **kw):
  return lambda t: adabound_authors.AdaBound(t, lr=LR, betas=(b1, b2), **kw)


def pytorch_opt(b1=0.9, b2=0.999, amsbound=False, **kw):
  # The authors' decay is an L2 penalty: pytorch_optimizer's weight_decouple=False.
  return lambda t: pytorch_optimizer.AdaBound(
      t, lr=LR, betas=(b1, b2), ams_bound=amsbound, weight_decouple=False, **kw
  )


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("make", [authors, pytorch_opt], ids=["authors", "pytorch_optimizer"])
def test_matches_torch_references(setting, make):
  kw = SETTINGS[setting]
  assert_follows_torch(adabound(LR, **kw), make(**kw), SHAPES, NUM_STEPS)


def test_clipping_is_active_in_fast_bounds_setting():
  # Guards the "fast_bounds" setting above: plain Adam (no clipping) must leave its trajectory.
  params, grads = random_problem(SHAPES, NUM_STEPS)
  kw = SETTINGS["fast_bounds"]
  ours = run_optax(adabound(LR, **kw), params, grads)[-1]
  unclipped = run_optax(adabound(LR, **{**kw, "final_lr": 1e9, "gamma": 1e-12}), params, grads)[-1]
  assert max(np.abs(ours[k] - unclipped[k]).max() for k in SHAPES) > 1e-2


@pytest.mark.parametrize("make", [authors, pytorch_opt], ids=["authors", "pytorch_optimizer"])
def test_schedule_and_inject_hyperparams(make):
  # The authors scale final_lr by lr_t / base_lr; here that is a final_lr schedule.
  kw = {"gamma": 0.1, "weight_decay": 0.1}
  final_lr = lambda count: 0.1 * EXACT_SCHEDULE(count) / LR
  assert_schedule_follows_torch(adabound, make(**kw), EXACT_SCHEDULE, SHAPES, NUM_STEPS, final_lr=final_lr, **kw)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision_params(dtype, tol):
  tx, reference = adabound(LR, gamma=0.1), authors(gamma=0.1)
  assert_low_precision_follows_torch(tx, reference, SHAPES, dtype, tol, state_copies=2)


def test_zero_gradients():
  kw = {"weight_decay": 0.1, "amsbound": True}
  assert_follows_torch(adabound(LR, **kw), authors(**kw), SHAPES, NUM_STEPS, grad_scale=0.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b1": 1.5}, "b1 must be in"),
        ({"gamma": 0.0}, "gamma must be > 0"),
        ({"gamma": 1.0}, "gamma must be in"),
        ({"final_lr": -0.1}, "final_lr must be >= 0"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"learning_rate": -LR}, "learning_rate must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    adabound(**{"learning_rate": LR, **kw})
