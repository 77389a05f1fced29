"""SANIA against a float64 torch transcription of the authors' SANIA_AdamSQR / SANIA_AdagradSQR step."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxpeft.optim.sania import sania
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_trajectories_close,
    random_problem,
    run_optax,
)

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 20

SETTINGS = {
    "defaults": {},
    "sqrt_other_b2_eps": {"is_sqrt": True, "b2": 0.9, "eps": 0.5},
    "adagrad": {"preconditioner": "adagrad"},
    "adagrad_sqrt_lr": {"preconditioner": "adagrad", "is_sqrt": True, "learning_rate": 0.5},
}


def losses(num_steps: int, seed: int = 1) -> list[float]:
  """Loss values spanning both branches: small ones (Polyak root exists) and large ones (full step)."""
  return list(np.random.default_rng(seed).uniform(0.0, 200.0, size=num_steps) / np.arange(1, num_steps + 1))


def authors_step_torch(
    params, grads, values, learning_rates, preconditioner="adam", b2=0.999, eps=0.1, is_sqrt=False, step_sizes=None
):
  """The authors' torch step transcribed (float64); params after each step (step sizes into `step_sizes`)."""
  p = {k: torch.tensor(v) for k, v in params.items()}
  acc = {k: torch.zeros_like(v) for k, v in p.items()}
  trajectory = []
  for t, (g_np, loss, lr) in enumerate(zip(grads, values, learning_rates), start=1):
    g = {k: torch.tensor(v) for k, v in g_np.items()}
    search = {}
    for k in p:
      if preconditioner == "adam":
        acc[k] = acc[k] * b2 + (1 - b2) * g[k].square()
        v_hat = acc[k] / (1 - b2**t)
      else:
        acc[k] = acc[k] + g[k] * g[k]
        v_hat = acc[k]
      floored = torch.maximum(torch.full_like(v_hat, eps), v_hat)
      search[k] = g[k] / (torch.sqrt(floored) if is_sqrt else floored)
    norm = sum((search[k] * g[k]).sum() for k in p)
    step_size = 1.0
    if 2 * loss <= norm:
      det = 1 - 2 * (loss / norm)
      if det > 0.0:
        step_size = float(1 - torch.sqrt(det))
    if step_sizes is not None:
      step_sizes.append(step_size)
    for k in p:
      p[k] = p[k] - lr * step_size * search[k]
    trajectory.append({k: v.numpy().copy() for k, v in p.items()})
  return trajectory


def run(tx, params, grads, values):
  return run_optax(tx, params, grads, extra_args=lambda i, _: {"value": jnp.asarray(values[i])})


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_authors_code(setting):
  kw = dict(SETTINGS[setting])
  lr = kw.pop("learning_rate", 1.0)
  params, grads = random_problem(SHAPES, NUM_STEPS)
  values = losses(NUM_STEPS)
  ref = authors_step_torch(params, grads, values, [lr] * NUM_STEPS, **kw)
  assert_trajectories_close(run(sania(lr, **kw), params, grads, values), ref)


@pytest.mark.parametrize("preconditioner", ["adam", "adagrad"])
def test_both_branches_are_exercised(preconditioner):
  """The loss values make some steps take the Polyak root (gamma < 1) and others the full step."""
  params, grads = random_problem(SHAPES, NUM_STEPS)
  step_sizes = []
  authors_step_torch(params, grads, losses(NUM_STEPS), [1.0] * NUM_STEPS, preconditioner, step_sizes=step_sizes)
  assert any(s < 1.0 for s in step_sizes) and any(s == 1.0 for s in step_sizes)


def test_schedule_and_inject_hyperparams():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  values = losses(NUM_STEPS)
  lrs = [float(EXACT_SCHEDULE(i)) for i in range(NUM_STEPS)]
  ref = authors_step_torch(params, grads, values, lrs)
  assert_trajectories_close(run(sania(EXACT_SCHEDULE), params, grads, values), ref)
  injected = optax.inject_hyperparams(sania)(EXACT_SCHEDULE)
  assert_trajectories_close(run(injected, params, grads, values), ref, atol=1e-7)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-4)])
def test_float32(dtype, atol):
  params, grads = random_problem(SHAPES, 5)
  values = losses(5)
  ref = authors_step_torch(params, grads, values, [1.0] * 5)[-1]
  tx = sania()
  p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
  state = tx.init(p)
  for g, v in zip(grads, values):
    updates, state = tx.update({k: jnp.asarray(x, dtype) for k, x in g.items()}, state, p, value=v)
    p = optax.apply_updates(p, updates)
  for k in params:
    assert p[k].dtype == dtype
    np.testing.assert_allclose(np.asarray(p[k], np.float64), ref[k], rtol=atol, atol=atol, err_msg=k)


def test_needs_the_loss_and_a_known_preconditioner():
  params, grads = random_problem(SHAPES, 1)
  tx = sania()
  with pytest.raises(ValueError, match="value=loss"):
    tx.update(grads[0], tx.init(params), params)
  with pytest.raises(ValueError, match="preconditioner must be one of"):
    sania(preconditioner="shampoo")
  with pytest.raises(ValueError, match="b2 must be in"):
    sania(b2=1.0)
