"""Muon against pytorch_optimizer.Muon (its Newton-Schulz iteration switched to float64)."""

import functools

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch
from pytorch_optimizer.optimizer.muon import base as muon_base

from jaxpeft.optim.muon import muon
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_optax_in_dtype,
    run_torch,
)

# A wide and a tall matrix, a conv kernel (h, w, in, out) and a vector (AdamW).
SHAPES = {"wide": (3, 5), "tall": (6, 4), "conv": (3, 3, 2, 4), "bias": (5,)}
NUM_STEPS = 12
LR = 2.0**-6

SETTINGS = {
    "defaults": {},
    "weight_decay_consistent_rms": {"weight_decay": 0.1, "adam_weight_decay": 0.2, "consistent_rms": 0.2},
    "no_nesterov_other_adam": {
        "nesterov": False,
        "beta": 0.9,
        "adam_learning_rate": 1e-2,
        "adam_b1": 0.8,
        "adam_b2": 0.99,
        "adam_eps": 1e-6,
    },
}
TORCH_NAMES = {
    "beta": "momentum",
    "nesterov": "nesterov",
    "weight_decay": "weight_decay",
    "adam_learning_rate": "adamw_lr",
    "adam_eps": "adamw_eps",
    "adam_weight_decay": "adamw_wd",
}


@pytest.fixture
def float64_newton_schulz(monkeypatch):
  """The reference iterates in bfloat16 by default: switch it to float64 for a parity test."""
  original = muon_base.zero_power_via_newton_schulz_5
  float64 = functools.partial(original, dtype=torch.float64)
  monkeypatch.setattr(muon_base, "zero_power_via_newton_schulz_5", float64)


def to_torch_layout(x: np.ndarray) -> np.ndarray:
  """Flax (..., in, out) -> PyTorch (out, prod(...in)); vectors unchanged."""
  return x if x.ndim < 2 else x.reshape(-1, x.shape[-1]).T.copy()


def from_torch_layout(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  return x if len(shape) < 2 else x.T.reshape(shape)


def make_reference(kw, lr=LR):
  others = {TORCH_NAMES[k]: v for k, v in kw.items() if k in TORCH_NAMES}
  if "consistent_rms" in kw:
    assert kw["consistent_rms"] == 0.2  # the reference's Moonlight factor is fixed at 0.2
    others["use_adjusted_lr"] = True
  betas = (kw.get("adam_b1", 0.9), kw.get("adam_b2", 0.95))

  def make(tensors):
    matrices = [t for t in tensors if t.ndim >= 2]
    vectors = [t for t in tensors if t.ndim < 2]
    groups = [dict(params=matrices, use_muon=True), dict(params=vectors, use_muon=False)]
    return pytorch_optimizer.Muon(groups, lr=lr, adamw_betas=betas, foreach=False, **others)

  return make


def run_reference(kw, params, grads, schedule=None, dtype=torch.float64):
  ref = run_torch(
      make_reference(kw),
      {k: to_torch_layout(v) for k, v in params.items()},
      [{k: to_torch_layout(v) for k, v in g.items()} for g in grads],
      dtype=dtype,
      schedule=schedule,
  )
  return [{k: from_torch_layout(v, params[k].shape) for k, v in step.items()} for step in ref]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_pytorch_optimizer(setting, float64_newton_schulz):
  kw = SETTINGS[setting]
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = run_reference(kw, params, grads)
  # eps=0: X_0 = U / ||U|| exactly as the reference's max(||U||, 1e-7) for these norms.
  assert_trajectories_close(run_optax(muon(LR, **kw, eps=0.0), params, grads), ref)
  # The default eps=1e-7 is added to ||U|| (optax): a relative change ~1e-7 / ||U|| per step, summed.
  assert_trajectories_close(run_optax(muon(LR, **kw), params, grads), ref, atol=LR * 1e-5)


def test_schedule_and_inject_hyperparams(float64_newton_schulz):
  params, grads = random_problem(SHAPES, NUM_STEPS)
  # The reference gives both groups the scheduled lr.
  ref = run_reference({"weight_decay": 0.1}, params, grads, schedule=EXACT_SCHEDULE)
  kw = dict(weight_decay=0.1, eps=0.0, adam_learning_rate=EXACT_SCHEDULE)
  assert_trajectories_close(run_optax(muon(EXACT_SCHEDULE, **kw), params, grads), ref)
  # inject_hyperparams hands beta etc. over as float32 scalars: float32-rounded hyperparameters.
  injected = optax.inject_hyperparams(muon)(EXACT_SCHEDULE, **kw)
  assert_trajectories_close(run_optax(injected, params, grads), ref, atol=1e-7)


def test_float32_tracks_the_bfloat16_reference():
  """The reference as shipped (bfloat16 iteration) against our float32 run: within 2**-5 of the total step."""
  params, grads = random_problem(SHAPES, 5)
  ref = run_reference({}, params, grads, dtype=torch.float32)[-1]
  ours, _, _ = run_optax_in_dtype(muon(LR), params, grads, jnp.float32)
  for k in params:
    np.testing.assert_allclose(np.asarray(ours[k]), ref[k], atol=5 * LR * 2**-5, err_msg=k)


def test_zero_gradient_gives_no_step():
  params, grads = random_problem(SHAPES, 3, grad_scale=0.0)
  ours = run_optax(muon(LR), params, grads)
  for k in params:
    np.testing.assert_array_equal(ours[-1][k], params[k])


def test_orthogonalizes():
  """With beta=0 and no Nesterov, one step of a 2-D gradient is -lr * (approximately) U V^T."""
  params, grads = random_problem({"w": (8, 3)}, 1)  # fan_out < fan_in: no width scaling
  step = params["w"] - run_optax(muon(1.0, beta=0.0, nesterov=False), params, grads)[0]["w"]
  singular_values = np.linalg.svd(step, compute_uv=False)
  assert np.all((singular_values > 0.6) & (singular_values < 1.25)), singular_values


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"beta": 1.0}, "beta must be in"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"adam_weight_decay": -0.1}, "adam_weight_decay"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    muon(**{"learning_rate": LR, **kw})
