"""Tests for jaxpeft/optim/momo.py against the authors' momo-opt (`momo.Momo`, `momo.MomoAdam`) and optax.contrib.

MoMo needs the loss as well as the gradient, so both sides are driven by the same stochastic
least-squares problem: at step i the loss is 0.5 * sum(s_i * (x - t_i)^2) / n + offset with fresh
random s_i, t_i, evaluated (in numpy) at each side's own current parameters.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import momo as momo_ref
import numpy as np
import optax
import pytest
import torch

from jaxpeft.optim.momo import momo, momo_adam
from tests.optim.reference import assert_trajectories_close

SHAPES = {"bias": (5,), "matrix": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 20
Params = dict[str, np.ndarray]
Problem = Callable[[int, Params], tuple[float, Params]]


def least_squares(
    shapes: dict[str, tuple[int, ...]], offset: float = 0.0, grad_scale: float = 1.0, seed: int = 1
) -> Problem:
  """Step-dependent loss and its exact gradient at any parameters (float64 numpy)."""
  rng = np.random.default_rng(seed)
  data = [{k: (rng.uniform(0.5, 2.0, size=s), rng.normal(size=s)) for k, s in shapes.items()} for _ in range(64)]
  n = sum(int(np.prod(s)) for s in shapes.values())

  def problem(i: int, x: Params) -> tuple[float, Params]:
    batch = data[i % len(data)]
    loss = offset + sum(0.5 * np.sum(s * (x[k] - t) ** 2) for k, (s, t) in batch.items()) / n
    grads = {k: grad_scale * s * (x[k] - t) / n for k, (s, t) in batch.items()}
    return grad_scale * loss, grads

  return problem


def initial_params(shapes: dict[str, tuple[int, ...]] = SHAPES, seed: int = 0) -> Params:
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s) for k, s in shapes.items()}


def run_ours(
    tx: optax.GradientTransformationExtraArgs,
    params: Params,
    problem: Problem,
    num_steps: int = NUM_STEPS,
    dtype=jnp.float64,
) -> list[Params]:
  """Ours, jitted, in `dtype` (loss and gradients evaluated in float64 at the current params)."""
  trajectory = []
  with jax.enable_x64(True):
    p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state, g, value):
      updates, state = tx.update(g, state, p, value=value)
      return optax.apply_updates(p, updates), state

    for i in range(num_steps):
      loss, grads = problem(i, {k: np.asarray(v, np.float64) for k, v in p.items()})
      p, state = step(p, state, {k: jnp.asarray(v, dtype) for k, v in grads.items()}, jnp.asarray(loss))
      trajectory.append({k: np.asarray(v) for k, v in p.items()})
  assert all(v.dtype == dtype for v in p.values())
  return trajectory


def run_reference(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    params: Params,
    problem: Problem,
    num_steps: int = NUM_STEPS,
    schedule: Callable[[int], float] | None = None,
) -> list[Params]:
  """The authors' torch optimizer in float64, given `loss=` like ours is given `value=`.

  The reference allocates its <g, x> average with torch's default dtype (`torch.zeros(1)`,
  `torch.tensor(0.)`), float32 unless changed, so the default is float64 while it runs.
  """
  default_dtype = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  try:
    return _run_reference(make_optimizer, params, problem, num_steps, schedule)
  finally:
    torch.set_default_dtype(default_dtype)


def _run_reference(make_optimizer, params, problem, num_steps, schedule):
  names = list(params)
  tensors = [torch.nn.Parameter(torch.tensor(params[k], dtype=torch.float64)) for k in names]
  opt = make_optimizer(tensors)
  trajectory = []
  for i in range(num_steps):
    loss, grads = problem(i, {k: t.detach().numpy().copy() for k, t in zip(names, tensors)})
    for t, k in zip(tensors, names):
      t.grad = torch.tensor(grads[k], dtype=torch.float64)
    if schedule is not None:
      for group in opt.param_groups:
        group["lr"] = schedule(i)
    opt.step(loss=torch.tensor(loss, dtype=torch.float64))
    trajectory.append({k: t.detach().numpy().copy() for k, t in zip(names, tensors)})
  return trajectory


# Plain arithmetic, so it is float64 under x64 (an optax.linear_schedule built outside x64 is float32).
SCHEDULE = lambda count: 1.0 - 0.9 * count / NUM_STEPS  # noqa: E731
ADAM_SCHEDULE = lambda count: 0.05 - 0.045 * count / NUM_STEPS  # noqa: E731


@pytest.mark.parametrize(
    "ours_kwargs, ref_kwargs, offset",
    [
        ({}, {}, 0.0),
        (
            {"learning_rate": 0.5, "beta": 0.8, "weight_decay": 0.1},
            {"lr": 0.5, "beta": 0.8, "weight_decay": 0.1},
            0.0,
        ),
        ({"bias_correction": True, "weight_decay": 0.05}, {"bias_correction": True, "weight_decay": 0.05}, 0.0),
        ({"lower_bound": 0.3}, {"lb": 0.3}, 0.5),
        ({"use_fstar": True, "weight_decay": 0.1}, {"use_fstar": True, "weight_decay": 0.1}, 1.0),
        (
            {"use_fstar": True, "bias_correction": True, "lower_bound": 0.2},
            {"use_fstar": True, "bias_correction": True, "lb": 0.2},
            1.0,
        ),
    ],
)
def test_momo_matches_authors(ours_kwargs, ref_kwargs, offset):
  problem = least_squares(SHAPES, offset=offset)
  params = initial_params()
  ours = run_ours(momo(**ours_kwargs), params, problem)
  ref = run_reference(lambda p: momo_ref.Momo(p, **ref_kwargs), params, problem)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)
  assert not np.allclose(ours[-1]["matrix"], params["matrix"])  # it moved


@pytest.mark.parametrize(
    "ours_kwargs, ref_kwargs, offset",
    [
        ({}, {}, 0.0),
        (
            {"learning_rate": 0.05, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.1},
            {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
            0.0,
        ),
        ({"weight_decay": 0.5, "divide": False}, {"weight_decay": 0.5, "divide": False}, 0.0),
        (
            {"lower_bound": 0.3, "use_fstar": True, "weight_decay": 0.1},
            {"lb": 0.3, "use_fstar": True, "weight_decay": 0.1},
            1.0,
        ),
    ],
)
def test_momo_adam_matches_authors(ours_kwargs, ref_kwargs, offset):
  problem = least_squares(SHAPES, offset=offset)
  params = initial_params()
  ours = run_ours(momo_adam(**ours_kwargs), params, problem)
  ref = run_reference(lambda p: momo_ref.MomoAdam(p, **ref_kwargs), params, problem)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)
  assert not np.allclose(ours[-1]["matrix"], params["matrix"])


@pytest.mark.parametrize(
    "make_ours, make_ref, schedule",
    [
        (momo, momo_ref.Momo, SCHEDULE),
        (momo_adam, momo_ref.MomoAdam, ADAM_SCHEDULE),
    ],
)
def test_schedule_and_inject_hyperparams_match_authors(make_ours, make_ref, schedule):
  """A schedule is evaluated at the number of steps taken (torch: lr set before each step)."""
  problem = least_squares(SHAPES)
  params = initial_params()
  ref = run_reference(lambda p: make_ref(p, weight_decay=0.1), params, problem, schedule=schedule)
  assert_trajectories_close(run_ours(make_ours(schedule, weight_decay=0.1), params, problem), ref, atol=1e-12)
  injected = optax.inject_hyperparams(make_ours)(learning_rate=schedule, weight_decay=0.1)
  assert_trajectories_close(run_ours(injected, params, problem), ref, atol=1e-12)


@pytest.mark.parametrize(
    "make_ours, make_optax, kwargs",
    [
        (momo, optax.contrib.momo, {}),
        (momo, optax.contrib.momo, {"adapt_lower_bound": True}),
        (momo_adam, optax.contrib.momo_adam, {}),
        (momo_adam, optax.contrib.momo_adam, {"adapt_lower_bound": True}),
    ],
)
def test_matches_optax_contrib_without_weight_decay(make_ours, make_optax, kwargs):
  problem = least_squares(SHAPES, offset=1.0)
  params = initial_params()
  ours = run_ours(make_ours(use_fstar=kwargs.get("adapt_lower_bound", False)), params, problem)
  assert_trajectories_close(ours, run_ours(make_optax(**kwargs), params, problem), atol=1e-12)


@pytest.mark.parametrize(
    "make_ours, make_optax", [(momo, optax.contrib.momo), (momo_adam, optax.contrib.momo_adam)]
)
def test_optax_contrib_skips_weight_decay_factor_on_the_step(make_ours, make_optax):
  """Documented offset: optax's x_1 = x_0 / c - tau u, ours (and the authors') (x_0 - tau u) / c.

  The first step size tau is the same in both, so (x_1 - x_0 / c) differs by exactly c = 1 + lr*wd.
  """
  lr, wd = 0.01, 2.0
  c = 1 + lr * wd
  problem = least_squares(SHAPES)
  params = initial_params()
  ours = run_ours(make_ours(lr, weight_decay=wd), params, problem, num_steps=1)[0]
  theirs = run_ours(make_optax(lr, weight_decay=wd), params, problem, num_steps=1)[0]
  ref = run_reference(
      lambda p: (momo_ref.Momo if make_ours is momo else momo_ref.MomoAdam)(p, lr=lr, weight_decay=wd),
      params,
      problem,
      num_steps=1,
  )[0]
  assert_trajectories_close([ours], [ref], atol=1e-12)
  for k in params:
    np.testing.assert_allclose(theirs[k] - params[k] / c, c * (ours[k] - params[k] / c), rtol=1e-9, atol=1e-14)
    assert not np.allclose(theirs[k], ours[k], rtol=1e-6)


@pytest.mark.parametrize("make_ours, make_ref", [(momo, momo_ref.Momo), (momo_adam, momo_ref.MomoAdam)])
def test_zero_and_huge_gradients_match_authors(make_ours, make_ref):
  params = initial_params()
  zero = lambda i, x: (1.0, {k: np.zeros_like(v) for k, v in x.items()})  # noqa: E731
  ours = run_ours(make_ours(weight_decay=0.1), params, zero, num_steps=3)
  ref = run_reference(lambda p: make_ref(p, weight_decay=0.1), params, zero, num_steps=3)
  assert_trajectories_close(ours, ref, atol=1e-12)
  huge = least_squares(SHAPES, grad_scale=1e30)
  assert_trajectories_close(
      run_ours(make_ours(), params, huge, num_steps=5),
      run_reference(make_ref, params, huge, num_steps=5),
      atol=1e-12,
  )
  huge_f32 = lambda i, x: (1.0, {k: 1e30 * np.ones_like(v) for k, v in x.items()})  # noqa: E731
  out = run_ours(make_ours(), params, huge_f32, num_steps=3, dtype=jnp.float32)
  assert all(np.isfinite(v).all() for step in out for v in step.values())


@pytest.mark.parametrize("make_ours", [momo, momo_adam])
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_low_precision_close_to_float64(make_ours, dtype, rtol):
  problem = least_squares(SHAPES)
  params = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for k, v in initial_params().items()}
  exact = run_ours(make_ours(weight_decay=0.1), params, problem, num_steps=10)
  low = run_ours(make_ours(weight_decay=0.1), params, problem, num_steps=10, dtype=dtype)
  for k in params:
    np.testing.assert_allclose(np.asarray(low[-1][k], np.float64), exact[-1][k], rtol=rtol, atol=rtol)


@pytest.mark.parametrize(
    "make_ours",
    [
        lambda axis_name: momo(weight_decay=0.1, use_fstar=True, axis_name=axis_name),
        lambda axis_name: momo_adam(weight_decay=0.1, use_fstar=True, axis_name=axis_name),
    ],
)
def test_pmap_axis_name_equals_single_device(make_ours):
  """Parameters sharded over 8 devices; per-device losses whose mean is the global loss."""
  n = jax.device_count()
  assert n == 8
  shapes = {"a": (n, 3), "b": (2 * n,)}
  problem = least_squares(shapes, offset=1.0)
  params = initial_params(shapes)
  single = run_ours(make_ours(None), params, problem, num_steps=5, dtype=jnp.float32)

  tx = make_ours("devices")
  offsets = jnp.asarray(np.random.default_rng(3).normal(size=n), jnp.float32)
  offsets = offsets - offsets.mean()
  shard = lambda tree: {"a": tree["a"], "b": tree["b"].reshape(n, 2)}  # noqa: E731
  unshard = lambda tree: {"a": np.asarray(tree["a"]), "b": np.asarray(tree["b"]).reshape(-1)}  # noqa: E731

  @functools.partial(jax.pmap, axis_name="devices")
  def step(p, state, g, value):
    updates, state = tx.update(g, state, p, value=value)
    return optax.apply_updates(p, updates), state

  p = shard({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
  state = jax.pmap(tx.init)(p)
  for i in range(5):
    loss, grads = problem(i, {k: v.astype(np.float64) for k, v in unshard(p).items()})
    p, state = step(
        p, state, shard({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}), jnp.float32(loss) + offsets
    )
    for k, v in unshard(p).items():
      np.testing.assert_allclose(v, single[i][k], rtol=1e-5, atol=1e-6, err_msg=f"step {i + 1}")


def test_errors_are_explained():
  params = {"w": jnp.ones(3)}
  tx = momo()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the current loss"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(params, state, value=1.0)
  with pytest.raises(ValueError, match="scalar loss"):
    tx.update(params, state, params, value=jnp.ones(2))
  with pytest.raises(ValueError, match="beta must be in"):
    momo(beta=1.0)
  with pytest.raises(ValueError, match="b2 must be in"):
    momo_adam(b2=-0.1)
  with pytest.raises(ValueError, match="weight_decay must be"):
    momo_adam(weight_decay=-1.0)
