"""Step-by-step comparison of a jaxpeft optimizer with a reference implementation.

Both sides start from the same parameters and receive the same gradient sequence (float64 unless a
test asks for another dtype); the parameters after every step are returned so a test can compare
whole trajectories.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

Params = dict[str, np.ndarray]
# A learning-rate schedule of powers of two: optax evaluates schedules in float32 even in a float64
# run, and these values are exact there.
EXACT_SCHEDULE = optax.piecewise_constant_schedule(2.0**-6, {8: 0.5, 16: 0.25})
MakeTorchOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def random_problem(
    shapes: dict[str, tuple[int, ...]], num_steps: int, seed: int = 0, grad_scale: float = 1.0
) -> tuple[Params, list[Params]]:
  """Initial float64 parameters and a sequence of float64 gradients of the given shapes."""
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  grads = [{k: grad_scale * rng.normal(size=s) for k, s in shapes.items()} for _ in range(num_steps)]
  return params, grads


def _optax_steps(
    tx: optax.GradientTransformation,
    params: Params,
    grads: Sequence[Params],
    dtype: jnp.dtype,
    extra_args: Callable[[int, Params], dict] | None = None,
) -> Iterator[tuple[dict[str, jax.Array], optax.OptState, optax.Updates]]:
  """Yields (params, state, updates) after each jitted step, everything cast to `dtype`."""
  p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
  state = tx.init(p)

  @jax.jit
  def step(p, state, g, kwargs):
    updates, state = tx.update(g, state, p, **kwargs)
    return optax.apply_updates(p, updates), state, updates

  for i, g in enumerate(grads):
    kwargs = extra_args(i, p) if extra_args else {}
    p, state, updates = step(p, state, {k: jnp.asarray(v, dtype) for k, v in g.items()}, kwargs)
    yield p, state, updates


def run_optax(
    tx: optax.GradientTransformation,
    params: Params,
    grads: Sequence[Params],
    extra_args: Callable[[int, Params], dict] | None = None,
) -> list[Params]:
  """Runs `tx` (jitted, float64) over the gradient sequence; returns params after each step."""
  with jax.enable_x64(True):
    return [
        {k: np.asarray(v) for k, v in p.items()}
        for p, _, _ in _optax_steps(tx, params, grads, jnp.float64, extra_args)
    ]


def run_optax_in_dtype(
    tx: optax.GradientTransformation, params: Params, grads: Sequence[Params], dtype: jnp.dtype
) -> tuple[dict[str, jax.Array], optax.OptState, optax.Updates]:
  """Runs `tx` (jitted, x64 not enabled) on params and gradients cast to `dtype`.

  Returns the final parameters, the final state and the last updates, as JAX values, so a test
  can check their dtypes.
  """
  *_, last = _optax_steps(tx, params, grads, dtype)
  return last


def assert_low_precision_tracks_float64(
    tx: optax.GradientTransformation, params: Params, grads: Sequence[Params], dtype: jnp.dtype, atol: float
) -> None:
  """Runs `tx` in `dtype` and checks it against its float64 run.

  Every floating leaf of the params, updates and state must keep `dtype`, the updates must have
  the params' structure, and the final params must be within `atol` of the float64 run's.
  """
  expected = run_optax(tx, params, grads)[-1]
  p, state, updates = run_optax_in_dtype(tx, params, grads, dtype)
  assert jax.tree.structure(updates) == jax.tree.structure(p)
  assert all(leaf.dtype == dtype for leaf in floating_leaves((p, updates, state)))
  assert_params_close(p, expected, rtol=1e-7, atol=atol)  # numpy's default rtol


class ScheduledTorch:
  """Sets the torch optimizer's lr from `schedule(step)` before each step."""

  def __init__(self, optimizer: torch.optim.Optimizer, schedule: optax.Schedule):
    self.optimizer, self.schedule, self.count = optimizer, schedule, 0

  def step(self):
    lr = float(self.schedule(self.count))
    for group in self.optimizer.param_groups:
      group["lr"] = lr
    self.count += 1
    self.optimizer.step()


def run_torch(
    make_optimizer: MakeTorchOptimizer,
    params: Params,
    grads: Sequence[Params],
    dtype: torch.dtype = torch.float64,
    schedule: optax.Schedule | None = None,
) -> list[Params]:
  """Runs a torch optimizer over the gradient sequence in `dtype`; params after each step.

  With `schedule`, the optimizer's lr is set to `schedule(k)` before step k (k from 0), as optax
  evaluates a schedule at the number of updates already made.
  """
  names = list(params)
  tensors = [torch.nn.Parameter(torch.tensor(params[k], dtype=dtype)) for k in names]
  opt = make_optimizer(tensors)
  if schedule is not None:
    opt = ScheduledTorch(opt, schedule)
  trajectory = []
  for g in grads:
    for t, k in zip(tensors, names):
      t.grad = torch.tensor(g[k], dtype=dtype)
    opt.step()
    trajectory.append({k: t.detach().numpy().copy() for k, t in zip(names, tensors)})
  return trajectory


def assert_schedule_and_injection_follow(
    factory: Callable[..., optax.GradientTransformation],
    schedule: optax.Schedule,
    params: Params,
    grads: Sequence[Params],
    ref: Sequence[Params],
    **kwargs,
) -> None:
  """`factory(schedule, **kwargs)` and its `optax.inject_hyperparams` version both follow `ref`."""
  for tx in _direct_and_injected(factory, schedule, **kwargs):
    assert_trajectories_close(run_optax(tx, params, grads), ref)


def _direct_and_injected(
    factory: Callable[..., optax.GradientTransformation], schedule: optax.Schedule, **kwargs
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """`factory(schedule, **kwargs)` and the same under `optax.inject_hyperparams`."""
  return factory(schedule, **kwargs), optax.inject_hyperparams(factory)(learning_rate=schedule, **kwargs)


def floating_leaves(tree) -> list[jax.Array]:
  """The leaves of `tree` with a floating dtype (e.g. to check an optimizer state's dtypes)."""
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def assert_params_close(
    ours: Mapping[str, jax.typing.ArrayLike], ref: Params, rtol: float = 1e-6, atol: float = 0.0, where: str = ""
) -> None:
  """Compares parameters leaf by leaf (ours converted to float64); `where` ends the message."""
  assert ours.keys() == ref.keys()
  for k in ours:
    np.testing.assert_allclose(
        np.asarray(ours[k], np.float64), ref[k], rtol=rtol, atol=atol, err_msg=f"param {k!r}{where}"
    )


def assert_trajectories_close(
    ours: Sequence[Params], ref: Sequence[Params], rtol: float = 1e-6, atol: float = 0.0
) -> None:
  """Fails at the first step whose parameters differ by more than `rtol` (relative)."""
  assert len(ours) == len(ref), f"{len(ours)} steps vs {len(ref)} reference steps"
  for step, (a, b) in enumerate(zip(ours, ref)):
    assert_params_close(a, b, rtol, atol, f" diverges at step {step + 1}")


def assert_follows_torch(
    tx: optax.GradientTransformation,
    make_optimizer: MakeTorchOptimizer,
    shapes: dict[str, tuple[int, ...]],
    num_steps: int,
    seed: int = 0,
    grad_scale: float = 1.0,
    schedule: optax.Schedule | None = None,
) -> None:
  """On `random_problem(shapes, num_steps, seed, grad_scale)`, `tx` stays finite and follows the torch optimizer.

  With `schedule`, the torch optimizer's lr is `schedule(k)` at step k (see `run_torch`).
  """
  params, grads = random_problem(shapes, num_steps, seed, grad_scale)
  ours = run_optax(tx, params, grads)
  assert all(np.isfinite(v).all() for step in ours for v in step.values())
  assert_trajectories_close(ours, run_torch(make_optimizer, params, grads, schedule=schedule))


def assert_schedule_follows_torch(
    factory: Callable[..., optax.GradientTransformation],
    make_optimizer: MakeTorchOptimizer,
    schedule: optax.Schedule,
    shapes: dict[str, tuple[int, ...]],
    num_steps: int,
    seed: int = 0,
    grad_scale: float = 1.0,
    **kwargs,
) -> None:
  """`factory(schedule, **kwargs)` and its injected version follow the torch optimizer run with lr = `schedule`."""
  for tx in _direct_and_injected(factory, schedule, **kwargs):
    assert_follows_torch(tx, make_optimizer, shapes, num_steps, seed, grad_scale, schedule)


def assert_low_precision_follows_torch(
    tx: optax.GradientTransformation,
    make_optimizer: MakeTorchOptimizer,
    shapes: dict[str, tuple[int, ...]],
    dtype: jnp.dtype,
    tol: float,
    state_copies: int,
    num_steps: int = 10,
) -> None:
  """Runs `tx` in `dtype` against the float64 torch optimizer.

  The params and the `state_copies` param-shaped state trees (the moments) must be every floating
  leaf and keep `dtype`, and the final params must be within `tol` (absolute and relative).
  """
  params, grads = random_problem(shapes, num_steps)
  ref = run_torch(make_optimizer, params, grads)[-1]
  p, state, _ = run_optax_in_dtype(tx, params, grads, dtype)
  float_leaves = floating_leaves((p, state))
  assert len(float_leaves) == (1 + state_copies) * len(shapes)
  assert all(x.dtype == dtype for x in float_leaves)
  assert_params_close(p, ref, rtol=tol, atol=tol)
