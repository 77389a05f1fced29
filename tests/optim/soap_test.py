"""SOAP against pytorch_optimizer.SOAP (a port of the official code), its QR switched to float64."""

import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch
from pytorch_optimizer.optimizer import soap as soap_module

from jaxpeft.optim.soap import soap
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_low_precision_tracks_float64,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_torch,
)

# Every preconditioned axis is at most the product of the others (plus one), so the step-1
# eigenbases are unique up to sign and both implementations rotate alike.
SHAPES = {"kernel": (4, 3), "conv": (3, 3, 2, 4), "bias": (5,)}
NUM_STEPS = 12  # one QR refresh (s = 10) with the default frequency
LR = 2.0**-6

SETTINGS = {
    "defaults": {},
    "others": {
        "b1": 0.9,
        "b2": 0.99,
        "shampoo_beta": 0.9,
        "eps": 1e-6,
        "weight_decay": 0.1,
        "precondition_frequency": 3,
    },
    "no_bias_correction_small_max_dim": {"correct_bias": False, "max_precondition_dim": 3},
}


@pytest.fixture
def float64_qr(monkeypatch):
  """The reference casts to float32 for its QR: make its `torch.float32` float64 for a parity test."""
  monkeypatch.setattr(soap_module, "torch", types.SimpleNamespace(**{**vars(torch), "float32": torch.float64}))


def make_reference(kw, lr=LR):
  b1, b2 = kw.get("b1", 0.95), kw.get("b2", 0.95)
  others = {k: v for k, v in kw.items() if k not in ("b1", "b2")}
  return lambda t: pytorch_optimizer.SOAP(t, lr=lr, betas=(b1, b2), **others)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_pytorch_optimizer(setting, float64_qr):
  kw = SETTINGS[setting]
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = run_torch(make_reference(kw), params, grads)
  assert_trajectories_close(run_optax(soap(LR, **kw), params, grads), ref)


def test_schedule_and_inject_hyperparams(float64_qr):
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = run_torch(make_reference({"weight_decay": 0.1}), params, grads, schedule=EXACT_SCHEDULE)
  assert_trajectories_close(run_optax(soap(EXACT_SCHEDULE, weight_decay=0.1), params, grads), ref)
  # inject_hyperparams hands b1, b2, ... over as float32 scalars: float32-rounded hyperparameters.
  injected = optax.inject_hyperparams(soap)(EXACT_SCHEDULE, weight_decay=0.1)
  assert_trajectories_close(run_optax(injected, params, grads), ref, atol=1e-6)


def test_first_step_only_fills_the_statistics():
  params, grads = random_problem(SHAPES, 1)
  ours = run_optax(soap(LR), params, grads)[0]
  for k in params:
    np.testing.assert_array_equal(ours[k], params[k])


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_low_precision(dtype, atol):
  params, grads = random_problem(SHAPES, 12)
  assert_low_precision_tracks_float64(soap(LR, precondition_frequency=3), params, grads, dtype, atol)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b2": 1.0}, "b2 must be in"),
        ({"shampoo_beta": -0.1}, "shampoo_beta"),
        ({"precondition_frequency": 0}, "precondition_frequency must be > 0"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    soap(**{"learning_rate": LR, **kw})
