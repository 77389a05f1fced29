"""COSMOS against a float64 torch transcription of the official COSMOS_optim.py step."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxpeft.optim.cosmos import cosmos
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_low_precision_tracks_float64,
    assert_trajectories_close,
    random_problem,
    run_optax,
)

# Flax kernels (inputs, outputs): a tall and a wide one; a vector and a conv kernel take Adam.
SHAPES = {"tall": (6, 4), "wide": (4, 7), "bias": (5,), "conv": (3, 3, 2, 4)}
NUM_STEPS = 12
LR = 2.0**-6

SETTINGS = {
    "rank2": {"rank": 2},
    "rank3_others": {"rank": 3, "b1": 0.9, "b2": 0.95, "eps": 1e-6, "lr_ratio": 0.5, "weight_decay": 0.1},
}


def newton_schulz(x, steps=5, eps=1e-7):
  """Muon's quintic iteration as in the official file, but in the input's dtype (float64)."""
  a, b, c = (3.4445, -4.7750, 2.0315)
  x = x / (x.norm() + eps)
  tall = x.size(0) > x.size(1)
  if tall:
    x = x.T
  for _ in range(steps):
    gram = x @ x.T
    y = gram @ x
    x = a * x + b * y + c * gram @ y
  return x.T if tall else x


def official(params, grads, learning_rates, rank=64, b1=0.9, b2=0.999, eps=1e-8, lr_ratio=0.1, weight_decay=0.0):
  """The official step transcribed in torch float64 on PyTorch-layout matrices; params after each step."""
  p = {k: torch.tensor(v.T.copy() if v.ndim == 2 else v) for k, v in params.items()}
  state = {k: {"m": torch.zeros_like(v), "v": None, "P": None, "S": None} for k, v in p.items()}
  trajectory = []
  for step, (g_np, lr) in enumerate(zip(grads, learning_rates), start=1):
    for k in p:
      g = torch.tensor(g_np[k].T.copy() if g_np[k].ndim == 2 else g_np[k])
      s = state[k]
      if g.ndim == 2:
        c1 = (1 - b1**step) / (1 - b1)
        c2 = 1 - b2**step
        s["m"] = b1 * s["m"] + g
        if step == 1:
          u, _, _ = torch.linalg.svd(g.T @ g, full_matrices=False)
          s["P"] = u[:, :rank]
          s["S"] = (s["P"].T @ g.T) @ (g @ s["P"]) * (1 - b2)
          s["v"] = torch.zeros(g.shape[0], s["P"].shape[1], dtype=g.dtype)
        else:
          old = s["P"]
          new = b2 * old @ s["S"] + (1 - b2) * g.T @ (g @ old)
          new, _ = torch.linalg.qr(new, mode="reduced")
          t = old.T @ new
          s["S"] = b2 * t.T @ s["S"] @ t + (1 - b2) * (g @ new).T @ (g @ new)
          s["P"] = new
        scale = (g.shape[0] * g.shape[1]) ** 0.5
        low = g @ s["P"]
        s["v"] = b2 * s["v"] + (1 - b2) * low * low
        g_hat = (g + b1 * s["m"]) / (1 + b1 * c1)
        t = g_hat @ s["P"]
        t1 = (t / (s["v"].sqrt() / c2**0.5 + eps)) @ s["P"].T
        rest = newton_schulz(g_hat - t @ s["P"].T)
        rest = rest / (rest.norm() + eps)
        t1 = t1 + scale * 0.2 * rest
        p[k] = p[k] * (1 - lr * weight_decay)
        p[k] = p[k] - scale * lr_ratio * lr * t1 / (t1.norm() + eps)
      else:
        if s["v"] is None:
          s["v"] = torch.zeros_like(g)
        s["m"] = b1 * s["m"] + 0.1 * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        denom = s["v"].sqrt() / (1 - b2**step) ** 0.5 + eps
        p[k] = p[k] * (1 - lr * weight_decay)
        p[k] = p[k] - lr / (1 - 0.9**step) * s["m"] / denom
    trajectory.append({k: (v.T if v.ndim == 2 else v).numpy().copy() for k, v in p.items()})
  return trajectory


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_official_code(setting):
  kw = SETTINGS[setting]
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = official(params, grads, [LR] * NUM_STEPS, **kw)
  assert_trajectories_close(run_optax(cosmos(LR, **kw), params, grads), ref)


def test_schedule_and_inject_hyperparams():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  lrs = [float(EXACT_SCHEDULE(i)) for i in range(NUM_STEPS)]
  ref = official(params, grads, lrs, rank=2, weight_decay=0.1)
  assert_trajectories_close(run_optax(cosmos(EXACT_SCHEDULE, rank=2, weight_decay=0.1), params, grads), ref)
  injected = optax.inject_hyperparams(cosmos, static_args="rank")(EXACT_SCHEDULE, rank=2, weight_decay=0.1)
  assert_trajectories_close(run_optax(injected, params, grads), ref, atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_low_precision(dtype, atol):
  params, grads = random_problem(SHAPES, 6)
  assert_low_precision_tracks_float64(cosmos(LR, rank=2), params, grads, dtype, atol)


@pytest.mark.parametrize(
    "kw, match",
    [({"b2": 1.0}, "b2 must be in"), ({"rank": 0}, "rank must be > 0"), ({"lr_ratio": -1.0}, "lr_ratio")],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    cosmos(**{"learning_rate": LR, **kw})
