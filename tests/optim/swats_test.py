"""SWATS against a float64 transcription of the paper's Algorithm 1 and pytorch_optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_optimizer

from jaxpeft.optim.swats import swats
from tests.optim.reference import (
    EXACT_SCHEDULE,
    floating_leaves,
    assert_params_close,
    assert_schedule_and_injection_follow,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_optax_in_dtype,
    run_torch,
)

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 2.0**-6


def algorithm_1(params, grads, learning_rates, b1=0.9, b2=0.999, eps=1e-9, weight_decay=0.0):
  """The paper's Algorithm 1 on the concatenated parameter vector (numpy, float64).

  Returns the params after each step and the step (from 1) at which it switched, or None.
  """
  names = list(params)
  flat = lambda tree: np.concatenate([tree[k].ravel() for k in names])
  w = flat(params)
  m, v, buf = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
  lam, sgd_lr, switched_at = 0.0, None, None
  trajectory = []
  for k, (g_tree, lr) in enumerate(zip(grads, learning_rates), start=1):
    g = flat(g_tree) + weight_decay * w
    if sgd_lr is not None:
      buf = b1 * buf + g
      w = w - (1 - b1) * sgd_lr * buf
    else:
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      p = -lr * np.sqrt(1 - b2**k) / (1 - b1**k) * m / (np.sqrt(v) + eps)
      w = w + p
      if p @ g != 0:
        gamma = (p @ p) / (-(p @ g))
        lam = b2 * lam + (1 - b2) * gamma
        estimate = lam / (1 - b2**k)
        if k > 1 and estimate > 0 and abs(estimate - gamma) < eps:
          sgd_lr, switched_at = estimate, k
    out, start = {}, 0
    for name in names:
      size = params[name].size
      out[name] = w[start : start + size].reshape(params[name].shape)
      start += size
    trajectory.append(out)
  return trajectory, switched_at


def switching_problem(shapes):
  """Constant gradients for 3 steps (Adam's step is then constant: gamma_1 = gamma_2, so the
  criterion holds at step 2), random ones afterwards (the SGD phase sees varied gradients)."""
  params, grads = random_problem(shapes, NUM_STEPS)
  return params, [grads[0]] * 3 + grads[3:]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_phase_matches_algorithm_1(weight_decay):
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref, switched_at = algorithm_1(params, grads, [LR] * NUM_STEPS, weight_decay=weight_decay)
  assert switched_at is None
  assert_trajectories_close(run_optax(swats(LR, weight_decay=weight_decay), params, grads), ref)


def test_switch_matches_algorithm_1():
  params, grads = switching_problem(SHAPES)
  ref, switched_at = algorithm_1(params, grads, [LR] * NUM_STEPS)
  assert switched_at == 2
  with jax.enable_x64(True):
    _, state, _ = run_optax_in_dtype(swats(LR), params, grads, jnp.float64)
  assert bool(state[1].sgd_phase)
  # With a constant gradient Adam's step is lr * g / (|g| + eps'), so Lambda = lr * n / ||g||_1
  # up to eps: the SGD rate that moves as far along g as Adam did.
  n = sum(g.size for g in grads[0].values())
  l1 = sum(np.abs(g).sum() for g in grads[0].values())
  np.testing.assert_allclose(float(state[1].sgd_lr), LR * n / l1, rtol=1e-6)
  assert_trajectories_close(run_optax(swats(LR), params, grads), ref)


@pytest.mark.parametrize("switching", [False, True], ids=["adam_phase", "switch"])
def test_single_tensor_matches_pytorch_optimizer(switching):
  # pytorch_optimizer estimates per tensor; with one tensor that is the paper's global estimate.
  shapes = {"kernel": (4, 3)}
  # With weight decay the gradient is not constant, so the switching problem needs none. eps=1e-9
  # (the paper's): with pytorch_optimizer's 1e-6, gamma_2 - gamma_1 ~ 2e-7 (eps under the bias
  # correction) passes the paper's |Lambda - gamma| < eps but not its relative allclose test.
  kw = {"eps": 1e-9, "weight_decay": 0.0 if switching else 0.1}
  params, grads = switching_problem(shapes) if switching else random_problem(shapes, NUM_STEPS)
  make = lambda t: pytorch_optimizer.SWATS(t, lr=LR, **kw)
  ref = run_torch(make, params, grads)
  assert_trajectories_close(run_optax(swats(LR, **kw), params, grads), ref)
  _, switched_at = algorithm_1(params, grads, [LR] * NUM_STEPS, **kw)
  assert switched_at == (2 if switching else None)


@pytest.mark.parametrize("switching", [False, True], ids=["adam_phase", "switch"])
def test_schedule_and_inject_hyperparams(switching):
  # After the switch (step 2) Lambda stays fixed while the schedule halves at steps 8 and 16.
  kw = {"weight_decay": 0.0 if switching else 0.1}
  params, grads = switching_problem(SHAPES) if switching else random_problem(SHAPES, NUM_STEPS)
  lrs = [float(EXACT_SCHEDULE(i)) for i in range(NUM_STEPS)]
  ref, switched_at = algorithm_1(params, grads, lrs, **kw)
  assert switched_at == (2 if switching else None)
  assert_schedule_and_injection_follow(swats, EXACT_SCHEDULE, params, grads, ref, **kw)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision(dtype, atol):
  # The two scalar learning-rate estimates stay float32: in bfloat16 an EMA with b2=0.999 would
  # not move (0.999 * x rounds back to x). Everything param-shaped keeps the params' dtype.
  params, grads = random_problem(SHAPES, 10)
  expected = run_optax(swats(LR), params, grads)[-1]
  p, state, updates = run_optax_in_dtype(swats(LR), params, grads, dtype)
  core = state[1]
  assert all(x.dtype == dtype for x in floating_leaves((p, updates, core.mu, core.nu, core.momentum)))
  assert core.sgd_lr_ema.dtype == core.sgd_lr.dtype == jnp.float32
  assert_params_close(p, expected, rtol=1e-7, atol=atol)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b2": 1.0}, "b2 must be in"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    swats(**{"learning_rate": LR, **kw})
