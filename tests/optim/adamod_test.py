"""AdaMod against the authors' adamod package and pytorch_optimizer."""

import adamod as adamod_authors
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch

from jaxpeft.optim.adamod import adamod
from tests.optim.reference import (
    assert_follows_torch,
    assert_low_precision_follows_torch,
    assert_params_close,
    assert_schedule_follows_torch,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_optax_in_dtype,
    run_torch,
)

# The authors' package uses torch's deprecated add_(scalar, tensor) overload.
pytestmark = pytest.mark.filterwarnings("ignore:This overload of add_:UserWarning")

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 1e-2

SETTINGS = {
    "defaults": {},
    "weight_decay": {"weight_decay": 0.1},
    "other_betas_eps": {"b1": 0.8, "b2": 0.99, "b3": 0.9, "eps": 1e-3},
}


def authors(b1=0.9, b2=0.999, b3=0.999, **kw):
  return lambda t: adamod_authors.AdaMod(t, lr=LR, betas=(b1, b2), beta3=b3, **kw)


def pytorch_opt(b1=0.9, b2=0.999, b3=0.999, **kw):
  return lambda t: pytorch_optimizer.AdaMod(t, lr=LR, betas=(b1, b2, b3), **kw)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("make", [authors, pytorch_opt], ids=["authors", "pytorch_optimizer"])
def test_matches_torch_references(setting, make):
  kw = SETTINGS[setting]
  assert_follows_torch(adamod(LR, **kw), make(**kw), SHAPES, NUM_STEPS)


def test_pytorch_optimizer_defaults_differ():
  # pytorch_optimizer defaults to betas=(0.9, 0.99, 0.9999); the authors to (0.9, 0.999), 0.999.
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = run_torch(lambda t: pytorch_optimizer.AdaMod(t, lr=LR), params, grads)
  assert_trajectories_close(run_optax(adamod(LR, b2=0.99, b3=0.9999), params, grads), ref)
  with pytest.raises(AssertionError, match="diverges at step"):
    assert_trajectories_close(run_optax(adamod(LR), params, grads), ref)


@pytest.mark.parametrize("make", [authors, pytorch_opt], ids=["authors", "pytorch_optimizer"])
def test_schedule_and_inject_hyperparams(make):
  # The step-size EMA averages lr-scaled step sizes, so a schedule changes the bound itself.
  schedule = optax.warmup_cosine_decay_schedule(0.0, LR, 5, NUM_STEPS, LR / 10)
  kw = {"weight_decay": 0.1}
  assert_schedule_follows_torch(adamod, make(**kw), schedule, SHAPES, NUM_STEPS, **kw)


# bfloat16 rounds parameters of size ~1 to 2**-8, so 10 steps of ~LR each may be off by ~1e-2.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision_params(dtype, tol):
  assert_low_precision_follows_torch(adamod(LR), authors(), SHAPES, dtype, tol, state_copies=3)  # mu, nu, eta


def test_zero_gradients():
  kw = {"weight_decay": 0.1}
  assert_follows_torch(adamod(LR, **kw), authors(**kw), SHAPES, NUM_STEPS, grad_scale=0.0)


def test_huge_gradients_float32():
  params, grads = random_problem(SHAPES, 8, grad_scale=1e30)
  ours, _, _ = run_optax_in_dtype(adamod(LR), params, grads, jnp.float32)
  ref = run_torch(authors(), params, grads, dtype=torch.float32)[-1]
  assert all(np.isfinite(v).all() for v in ref.values())
  assert_params_close(ours, ref, rtol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b1": 1.5}, "b1 must be in"),
        ({"b3": -0.1}, "b3 must be in"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"learning_rate": -LR}, "learning_rate must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    adamod(**{"learning_rate": LR, **kw})
