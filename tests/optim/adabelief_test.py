"""AdaBelief against the authors' adabelief-pytorch, pytorch_optimizer and optax."""

import adabelief_pytorch
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch

from jaxpeft.optim.adabelief import adabelief
from tests.optim.reference import (
    assert_follows_torch,
    assert_low_precision_follows_torch,
    assert_schedule_follows_torch,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_optax_in_dtype,
    run_torch,
)

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25  # the rectified update starts at step 6 with b2 = 0.999
LR = 1e-2

# Our keyword arguments; the authors' package takes the same names (betas as a pair).
SETTINGS = {
    "defaults": {},
    "no_rectify": {"rectify": False},
    "amsgrad": {"amsgrad": True, "rectify": False},
    "decoupled_decay": {"weight_decay": 0.1},
    "fixed_decay": {"weight_decay": 0.01, "fixed_decay": True},
    "l2_decay": {"weight_decay": 0.1, "weight_decouple": False},
    "no_sgd_warmup": {"degenerated_to_sgd": False},
    "other_betas_eps": {"b1": 0.8, "b2": 0.99, "eps": 1e-8},
}


def authors(b1=0.9, b2=0.999, **kw):
  return lambda t: adabelief_pytorch.AdaBelief(t, lr=LR, betas=(b1, b2), print_change_log=False, **kw)


# pytorch_optimizer defaults to rectify=False, the authors to True.
def pytorch_opt(b1=0.9, b2=0.999, amsgrad=False, rectify=True, **kw):
  return lambda t: pytorch_optimizer.AdaBelief(t, lr=LR, betas=(b1, b2), ams_bound=amsgrad, rectify=rectify, **kw)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("make", [authors, pytorch_opt], ids=["authors", "pytorch_optimizer"])
def test_matches_torch_references(setting, make):
  kw = SETTINGS[setting]
  assert_follows_torch(adabelief(LR, **kw), make(**kw), SHAPES, NUM_STEPS)


@pytest.mark.parametrize("make", [authors, pytorch_opt], ids=["authors", "pytorch_optimizer"])
def test_tiny_gradients_where_eps_matters(make):
  # With |g| ~ 1e-7 the eps accumulated in s_t (1e-13 after bias correction) is 10% of it.
  params, grads = random_problem(SHAPES, NUM_STEPS, grad_scale=1e-7)
  ours = run_optax(adabelief(LR), params, grads)
  assert_trajectories_close(ours, run_torch(make(), params, grads))
  without_eps = run_optax(adabelief(LR, eps=0.0), params, grads)
  with pytest.raises(AssertionError):
    assert_trajectories_close(without_eps, ours)


def test_amsgrad_with_rectify_is_an_error_because_references_disagree():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  kw = {"amsgrad": True}
  # The authors keep max(s_t) but never use it when rectifying: identical to amsgrad=False ...
  assert_trajectories_close(run_torch(authors(**kw), params, grads), run_optax(adabelief(LR), params, grads))
  # ... while pytorch_optimizer divides the rectified step by sqrt(max s_t).
  with pytest.raises(AssertionError, match="diverges at step"):
    assert_trajectories_close(run_torch(pytorch_opt(**kw), params, grads), run_optax(adabelief(LR), params, grads))
  with pytest.raises(ValueError, match="rectify=False"):
    adabelief(LR, amsgrad=True)


@pytest.mark.parametrize("grad_scale", [1.0, 1e-7])
def test_matches_optax_adabelief_without_rectify(grad_scale):
  # optax.adabelief adds eps_root to the state after the EMA, as the authors add eps.
  eps = 1e-16
  params, grads = random_problem(SHAPES, NUM_STEPS, grad_scale=grad_scale)
  ours = run_optax(adabelief(LR, eps=eps, rectify=False), params, grads)
  ref = run_optax(optax.adabelief(LR, eps=eps, eps_root=eps), params, grads)
  assert_trajectories_close(ours, ref)


def test_schedule_and_inject_hyperparams():
  schedule = optax.linear_schedule(LR, LR / 10, NUM_STEPS)
  kw = {"weight_decay": 0.1}
  assert_schedule_follows_torch(adabelief, authors(**kw), schedule, SHAPES, NUM_STEPS, **kw)


# bfloat16 rounds parameters of size ~1 to 2**-8, so 10 steps of ~LR each may be off by ~1e-2.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision_params(dtype, tol):
  assert_low_precision_follows_torch(adabelief(LR), authors(), SHAPES, dtype, tol, state_copies=2)  # mu, nu


def test_zero_gradients():
  assert_follows_torch(adabelief(LR), authors(), SHAPES, NUM_STEPS, grad_scale=0.0)


def test_huge_gradients_float32():
  params, grads = random_problem(SHAPES, 8, grad_scale=1e30)
  ours, _, _ = run_optax_in_dtype(adabelief(LR), params, grads, jnp.float32)
  ref = run_torch(authors(), params, grads, dtype=torch.float32)[-1]
  for k in params:
    assert np.isfinite(ref[k]).all()
    # float32 sums of ~1e28 steps that partly cancel: compare at the scale of the largest entry.
    np.testing.assert_allclose(np.asarray(ours[k]), ref[k], atol=1e-5 * np.abs(ref[k]).max(), err_msg=k)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b2": 1.0}, "b2 must be in"),
        ({"eps": -1e-16}, "eps must be >= 0"),
        ({"learning_rate": -LR}, "learning_rate must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"weight_decay": 0.1, "weight_decouple": False, "fixed_decay": True}, "weight_decouple=True"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    adabelief(**{"learning_rate": LR, **kw})
