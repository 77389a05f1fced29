"""ADOPT against the authors' torch-adopt, pytorch_optimizer and optax.contrib.adopt."""

import adopt as adopt_authors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch

from jaxpeft.optim.adopt import adopt
from tests.optim.reference import (
    assert_params_close,
    assert_schedule_and_injection_follow,
    assert_trajectories_close,
    random_problem,
    run_optax,
    run_optax_in_dtype,
    run_torch,
)

# torch-adopt 0.1.0 calls torch helpers that torch 2.13 deprecates.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Use _accelerator_graph_capture_health_check:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch._utils.is_compiling` is deprecated:UserWarning"),
]

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 1e-2

# Clipping is active in these runs: with b2 close to 1, |g_k| / sqrt(v_{k-1}) often exceeds k**0.25.
SETTINGS = {
    "defaults": {},
    "l2_decay": {"weight_decay": 0.1},
    "no_clipping": {"clip_lambda": None},
    "other_clip": {"clip_lambda": lambda k: 0.5 * k**0.5},
    "other_betas_eps": {"b1": 0.5, "b2": 0.9, "eps": 1e-2},
}


def authors(b1=0.9, b2=0.9999, **kw):
  return lambda t: adopt_authors.ADOPT(t, lr=LR, betas=(b1, b2), **kw)


def pytorch_opt(b1=0.9, b2=0.9999, clip_lambda=lambda k: k**0.25, decouple=False, **kw):
  # pytorch_optimizer passes clip_lambda the 1-based step; shift it to the authors' 0-based count.
  shifted = None if clip_lambda is None else lambda step: clip_lambda(step - 1)
  return lambda t: pytorch_optimizer.ADOPT(
      t, lr=LR, betas=(b1, b2), clip_lambda=shifted, weight_decouple=decouple, **kw
  )


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("make", [authors, pytorch_opt], ids=["authors", "pytorch_optimizer"])
def test_matches_torch_references(setting, make):
  kw = SETTINGS[setting]
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ours = run_optax(adopt(LR, **kw), params, grads)
  assert_trajectories_close(ours, run_torch(make(**kw), params, grads))


def test_clipping_is_exercised():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  unclipped = run_optax(adopt(LR, clip_lambda=None), params, grads)
  with pytest.raises(AssertionError, match="diverges at step 2"):
    assert_trajectories_close(run_optax(adopt(LR), params, grads), unclipped)


def test_pytorch_optimizer_clip_runs_one_step_ahead():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = run_torch(lambda t: pytorch_optimizer.ADOPT(t, lr=LR), params, grads)
  ours_shifted = run_optax(adopt(LR, clip_lambda=lambda k: (k + 1) ** 0.25), params, grads)
  assert_trajectories_close(ours_shifted, ref)
  with pytest.raises(AssertionError, match="diverges at step 2"):
    assert_trajectories_close(run_optax(adopt(LR), params, grads), ref)


def test_decoupled_decay_skips_first_step_like_authors():
  kw = {"weight_decay": 0.1, "decouple": True}
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ours = run_optax(adopt(LR, **kw), params, grads)
  assert_trajectories_close(ours, run_torch(authors(**kw), params, grads))
  for k in params:  # the first step leaves the weights alone, decay included
    np.testing.assert_array_equal(ours[0][k], params[k])
  # pytorch_optimizer already decays the weights on the first call.
  with pytest.raises(AssertionError, match="diverges at step 1"):
    assert_trajectories_close(ours, run_torch(pytorch_opt(**kw), params, grads))


@pytest.mark.parametrize("clip", [True, False])
def test_matches_optax_contrib_adopt(clip):
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ours = run_optax(adopt(LR, **({} if clip else {"clip_lambda": None})), params, grads)
  ref = run_optax(optax.contrib.adopt(LR, use_clipping=clip), params, grads)
  assert_trajectories_close(ours, ref)


def test_schedule_and_inject_hyperparams():
  schedule = optax.linear_schedule(LR, LR / 10, NUM_STEPS)
  kw = {"weight_decay": 0.1, "decouple": True}
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = run_torch(authors(**kw), params, grads, schedule=schedule)
  # inject_hyperparams evaluates the callable clip_lambda at its step count and passes the value.
  assert_schedule_and_injection_follow(adopt, schedule, params, grads, ref, **kw)


# bfloat16 rounds parameters of size ~1 to 2**-8, so 10 steps of ~LR each may be off by ~1e-2.
@pytest.mark.parametrize(
    "dtype, mu_dtype, tol",
    [(jnp.float32, None, 1e-5), (jnp.bfloat16, None, 3e-2), (jnp.bfloat16, jnp.float32, 3e-2)],
)
def test_low_precision_params(dtype, mu_dtype, tol):
  params, grads = random_problem(SHAPES, 10)
  ref = run_torch(authors(), params, grads)[-1]
  p, state, updates = run_optax_in_dtype(adopt(LR, mu_dtype=mu_dtype), params, grads, dtype)
  core_state = state[1]
  assert all(x.dtype == dtype for x in jax.tree.leaves((p, updates, core_state.nu)))
  assert all(x.dtype == (mu_dtype or dtype) for x in jax.tree.leaves(core_state.mu))
  assert_params_close(p, ref, rtol=tol, atol=tol)


def test_zero_gradients():
  params, grads = random_problem(SHAPES, NUM_STEPS, grad_scale=0.0)
  ours = run_optax(adopt(LR), params, grads)
  assert_trajectories_close(ours, run_torch(authors(), params, grads))


@pytest.mark.parametrize("clip_lambda", [lambda k: k**0.25, None], ids=["clip", "no_clip"])
def test_huge_gradients_float32(clip_lambda):
  # g**2 overflows to inf in float32; the authors then take zero steps, without NaN.
  params, grads = random_problem(SHAPES, 8, grad_scale=1e30)
  ours, _, _ = run_optax_in_dtype(adopt(LR, clip_lambda=clip_lambda), params, grads, jnp.float32)
  ref = run_torch(authors(clip_lambda=clip_lambda), params, grads, dtype=torch.float32)[-1]
  assert all(np.isfinite(v).all() for v in ref.values())
  assert_params_close(ours, ref, rtol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b1": 1.5}, "b1 must be in"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"learning_rate": -LR}, "learning_rate must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    adopt(**{"learning_rate": LR, **kw})
