"""Tests for jaxpeft/optim/adahessian.py against pytorch_optimizer.AdaHessian and closed forms.

Random vectors differ between frameworks, so the trajectory tests use a separable objective
f(x) = sum(a x^2 / 2 + b x^4 / 4) (+ a linear term) whose Hessian is exactly diagonal,
diag H = a + 3 b x^2: Hutchinson's z * (H z) then equals it for every Rademacher draw, on both sides.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from pytorch_optimizer import AdaHessian

from jaxpeft.optim.adahessian import adahessian, hutchinson_hessian_diagonal
from tests.optim.reference import assert_trajectories_close

# Flax layout; the conv kernel is HWIO (torch OIHW is its transpose (3, 2, 0, 1)).
SHAPES = {"bias": (5,), "matrix": (4, 3), "conv": (3, 3, 2, 4)}
TO_TORCH = {"bias": (0,), "matrix": (0, 1), "conv": (3, 2, 0, 1)}
NUM_STEPS = 20


def coefficients(shapes=SHAPES, seed=0):
  rng = np.random.default_rng(seed)
  return {k: (rng.uniform(0.5, 2.0, s), rng.uniform(0.1, 1.0, s), rng.normal(size=s)) for k, s in shapes.items()}


def objective(coef, scale=1.0):
  """Separable quartic plus a linear term; works for jnp and torch leaves alike."""

  def f(x):
    return scale * sum(((a * x[k] ** 2 / 2 + b * x[k] ** 4 / 4 + c * x[k])).sum() for k, (a, b, c) in coef.items())

  return f


def exact_diagonal(coef, x, scale=1.0):
  return {k: scale * (a + 3 * b * x[k] ** 2) for k, (a, b, _) in coef.items()}


def initial_params(shapes=SHAPES, seed=1):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s) for k, s in shapes.items()}


def to_torch_layout(tree):
  return {k: np.transpose(v, TO_TORCH[k]) for k, v in tree.items()}


def from_torch_layout(tree):
  return {k: np.transpose(v, np.argsort(TO_TORCH[k])) for k, v in tree.items()}


def run_ours(tx, params, coef, num_steps=NUM_STEPS, dtype=jnp.float64, scale=1.0, zero_grads=False):
  trajectory = []
  with jax.enable_x64(True):
    f = objective({k: tuple(jnp.asarray(c, dtype) for c in v) for k, v in coef.items()}, scale)
    p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state):
      grads = jax.grad(f)(p)
      if zero_grads:
        grads = jax.tree.map(jnp.zeros_like, grads)
      updates, state = tx.update(grads, state, p, obj_fn=f)
      return optax.apply_updates(p, updates), state

    for _ in range(num_steps):
      p, state = step(p, state)
      trajectory.append({k: np.asarray(v) for k, v in p.items()})
  assert all(v.dtype == dtype for v in p.values())
  return trajectory


def run_torch(make_optimizer, params, coef, num_steps=NUM_STEPS, hessian_fn=None, schedule=None, scale=1.0):
  """pytorch_optimizer in float64, torch layout; its own autograd Hutchinson unless `hessian_fn`.

  `hessian_fn(x)` (x in torch layout, numpy) gives the Hessian estimate passed as `step(hessian=...)`.
  """
  names = list(params)
  torch_params = to_torch_layout(params)
  torch_coef = {k: tuple(torch.tensor(np.transpose(c, TO_TORCH[k])) for c in v) for k, v in coef.items()}
  f = objective(torch_coef, scale)
  tensors = {k: torch.nn.Parameter(torch.tensor(torch_params[k], dtype=torch.float64)) for k in names}
  opt = make_optimizer(list(tensors.values()))
  trajectory = []
  for i in range(num_steps):
    grads = torch.autograd.grad(f(tensors), list(tensors.values()), create_graph=hessian_fn is None)
    for t, g in zip(tensors.values(), grads):
      t.grad = g
    if schedule is not None:
      for group in opt.param_groups:
        group["lr"] = schedule(i)
    if hessian_fn is None:
      opt.step()
    else:
      hessian = hessian_fn({k: t.detach().numpy() for k, t in tensors.items()})
      opt.step(hessian=[torch.tensor(hessian[k]) for k in names])
    for t in tensors.values():  # drop the graph of create_graph
      t.grad = None
    trajectory.append(from_torch_layout({k: t.detach().numpy().copy() for k, t in tensors.items()}))
  return trajectory


def test_hutchinson_is_exact_for_a_diagonal_hessian():
  coef, params = coefficients(), initial_params()
  with jax.enable_x64(True):
    f = objective(coef)
    x = {k: jnp.asarray(v) for k, v in params.items()}
    estimate_fn = jax.jit(functools.partial(hutchinson_hessian_diagonal, f))
    for seed in range(3):
      estimate = estimate_fn(x, jax.random.PRNGKey(seed))
      for k, d in exact_diagonal(coef, params).items():
        np.testing.assert_allclose(np.asarray(estimate[k]), d, rtol=1e-12)


def test_hutchinson_on_a_dense_hessian():
  """Each draw is z * (A z) for some sign vector z; the mean over draws tends to diag(A)."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(4, 4))
  a = m @ m.T + np.eye(4)
  with jax.enable_x64(True):
    f = lambda x: 0.5 * x["w"] @ jnp.asarray(a) @ x["w"] + jnp.sum(jnp.sin(x["v"]))  # noqa: E731
    x = {"w": jnp.asarray(rng.normal(size=4)), "v": jnp.asarray(rng.normal(size=3))}
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.jit(jax.vmap(lambda key: hutchinson_hessian_diagonal(f, x, key)))(keys)
  w_draws = np.asarray(draws["w"])
  patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
  candidates = patterns * (patterns @ a)  # z * (A z) for every z; A is symmetric
  for d in w_draws[:50]:
    assert np.min(np.max(np.abs(candidates - d), axis=1)) < 1e-12
  np.testing.assert_allclose(
      np.asarray(draws["v"]), np.broadcast_to(-np.sin(np.asarray(x["v"])), (4000, 3)), rtol=1e-12
  )
  sigma = np.sqrt((np.sum(a**2, axis=1) - np.diag(a) ** 2) / len(w_draws))
  assert np.all(np.abs(w_draws.mean(0) - np.diag(a)) < 5 * sigma)
  assert np.std(w_draws[:, 0]) > 0  # the draws do vary


@pytest.mark.parametrize(
    "ours_kwargs, ref_kwargs",
    [
        ({}, {}),
        (
            {"learning_rate": 0.05, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.1},
            {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
        ),
        ({"hessian_power": 0.5}, {"hessian_power": 0.5}),
        ({"update_each": 3, "weight_decay": 0.01}, {"update_period": 3, "weight_decay": 0.01}),
    ],
)
def test_matches_pytorch_optimizer_without_spatial_averaging(ours_kwargs, ref_kwargs):
  coef, params = coefficients(), initial_params()
  ours = run_ours(adahessian(conv_spatial_axes=None, **ours_kwargs), params, coef)
  ref = run_torch(lambda p: AdaHessian(p, **{"lr": 0.15, "eps": 1e-4, **ref_kwargs}), params, coef)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)
  assert not np.allclose(ours[-1]["conv"], params["conv"])


def authors_spatial_average(coef):
  """The authors' estimate for torch layout: |z * Hz| (= |diag H| here) averaged over OIHW dims [2, 3]."""

  def hessian_fn(x):
    diag = to_torch_layout(exact_diagonal(coef, from_torch_layout(x)))
    return {
        k: np.broadcast_to(np.mean(np.abs(d), axis=(2, 3), keepdims=True), d.shape) if d.ndim == 4 else d
        for k, d in diag.items()
    }

  return hessian_fn


def test_spatial_averaging_matches_authors_layouts():
  """Flax HWIO with axes (0, 1) == the authors' OIHW dims [2, 3] == OIHW leaves with axes (2, 3)."""
  coef, params = coefficients(), initial_params()
  ours = run_ours(adahessian(weight_decay=0.01), params, coef)
  ref = run_torch(
      lambda p: AdaHessian(p, lr=0.15, eps=1e-4, weight_decay=0.01),
      params,
      coef,
      hessian_fn=authors_spatial_average(coef),
  )
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)
  torch_layout = run_ours(
      adahessian(weight_decay=0.01, conv_spatial_axes=(2, 3)),
      to_torch_layout(params),
      {k: tuple(np.transpose(c, TO_TORCH[k]) for c in v) for k, v in coef.items()},
  )
  assert_trajectories_close([from_torch_layout(t) for t in torch_layout], ref, rtol=1e-6, atol=1e-12)
  unaveraged = run_ours(adahessian(weight_decay=0.01, conv_spatial_axes=None), params, coef)
  assert not np.allclose(unaveraged[-1]["conv"], ours[-1]["conv"], rtol=1e-4)
  np.testing.assert_allclose(unaveraged[-1]["matrix"], ours[-1]["matrix"], rtol=1e-12)


def test_schedule_and_inject_hyperparams_match_pytorch_optimizer():
  coef, params = coefficients(), initial_params()
  schedule = lambda count: 0.15 - 0.1 * count / NUM_STEPS  # noqa: E731
  ref = run_torch(
      lambda p: AdaHessian(p, lr=0.15, eps=1e-4, weight_decay=0.1, update_period=2),
      params,
      coef,
      schedule=schedule,
  )
  ours = run_ours(adahessian(schedule, weight_decay=0.1, update_each=2, conv_spatial_axes=None), params, coef)
  assert_trajectories_close(ours, ref, atol=1e-12)
  injected = optax.inject_hyperparams(adahessian)(
      learning_rate=schedule, weight_decay=0.1, update_each=2, conv_spatial_axes=None
  )
  assert_trajectories_close(run_ours(injected, params, coef), ref, atol=1e-12)


def test_zero_and_huge_gradients():
  coef, params = coefficients(), initial_params()
  # Zero gradients: no step (the Hessian estimate is non-zero), as in pytorch_optimizer.
  ours = run_ours(adahessian(), params, coef, num_steps=3, zero_grads=True)
  for step in ours:
    for k in params:
      np.testing.assert_array_equal(step[k], params[k])
  # 1e30-scale gradients and Hessian: float64 matches the reference, float32 stays finite.
  scale = 1e30
  ref = run_torch(lambda p: AdaHessian(p, lr=0.15, eps=1e-4), params, coef, num_steps=5, scale=scale)
  ours = run_ours(adahessian(conv_spatial_axes=None), params, coef, num_steps=5, scale=scale)
  assert_trajectories_close(ours, ref, atol=1e-12)
  out = run_ours(adahessian(), params, coef, num_steps=3, scale=scale, dtype=jnp.float32)
  assert all(np.isfinite(v).all() for step in out for v in step.values())


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_low_precision_close_to_float64(dtype, tol):
  coef = {
      k: tuple(np.asarray(jnp.asarray(c, jnp.bfloat16), np.float64) for c in v) for k, v in coefficients().items()
  }
  params = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for k, v in initial_params().items()}
  exact = run_ours(adahessian(weight_decay=0.01), params, coef, num_steps=5)
  low = run_ours(adahessian(weight_decay=0.01), params, coef, num_steps=5, dtype=dtype)
  for k in params:
    np.testing.assert_allclose(np.asarray(low[-1][k], np.float64), exact[-1][k], rtol=tol, atol=tol)


def test_pmap_axis_name_averages_hessian_over_data_shards():
  """8 devices, each with 2 of 16 examples: pmean-ed gradients and Hessians == full batch."""
  n = jax.device_count()
  assert n == 8
  rng = np.random.default_rng(2)
  a, b, t = rng.uniform(0.5, 2.0, (2 * n, 6)), rng.uniform(0.1, 1.0, (2 * n, 6)), rng.normal(size=(2 * n, 6))
  params = {"w": jnp.asarray(rng.normal(size=6), jnp.float32)}

  def loss(p, batch):
    a, b, t = batch
    r = p["w"] - t
    return jnp.mean(jnp.sum(a * r**2 / 2 + b * r**4 / 4, axis=-1))

  full = tuple(jnp.asarray(v, jnp.float32) for v in (a, b, t))
  tx = adahessian(update_each=2)
  state = tx.init(params)
  single = []
  p = params
  for _ in range(4):
    f = functools.partial(loss, batch=full)
    updates, state = tx.update(jax.grad(f)(p), state, p, obj_fn=f)
    p = optax.apply_updates(p, updates)
    single.append(p["w"])

  tx = adahessian(update_each=2, axis_name="batch")

  @functools.partial(jax.pmap, axis_name="batch")
  def step(p, state, batch):
    f = functools.partial(loss, batch=batch)
    grads = jax.lax.pmean(jax.grad(f)(p), "batch")
    updates, state = tx.update(grads, state, p, obj_fn=f)
    return optax.apply_updates(p, updates), state

  replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)  # noqa: E731
  shards = tuple(v.reshape(n, 2, 6) for v in full)
  p, state = replicate(params), replicate(tx.init(params))
  for i in range(4):
    p, state = step(p, state, shards)
    np.testing.assert_allclose(np.asarray(p["w"]), np.broadcast_to(single[i], (n, 6)), rtol=1e-5, atol=1e-6)


def test_errors_are_explained():
  params = {"w": jnp.ones(3)}
  tx = adahessian()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the parameters and the objective"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="hessian_power must be in"):
    adahessian(hessian_power=1.5)
  with pytest.raises(ValueError, match="update_each must be"):
    adahessian(update_each=0)
  with pytest.raises(ValueError, match="key must be"):
    adahessian(key=0.5).init(params)
  typed_key = adahessian(key=jax.random.key(3)).init(params)[0].key  # a typed key is accepted as is
  assert jax.dtypes.issubdtype(typed_key.dtype, jax.dtypes.prng_key)


def test_mu_dtype_keeps_the_gradient_average_in_that_dtype():
  coef, params = coefficients(), initial_params()
  exact = run_ours(adahessian(weight_decay=0.01), params, coef, num_steps=5)
  tx = adahessian(weight_decay=0.01, mu_dtype=jnp.bfloat16)
  low = run_ours(tx, params, coef, num_steps=5, dtype=jnp.float32)
  state = tx.init({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
  assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state[0].mu))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state[0].nu))
  for k in params:
    np.testing.assert_allclose(low[-1][k], exact[-1][k], rtol=2e-2, atol=2e-2)
