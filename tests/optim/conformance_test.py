"""Conformance suite: every jaxpeft optimizer behaves like an optax transformation.

Modelled on optax/contrib/_common_test.py and optax/_src/sharding_test.py. Each registered
optimizer (small hyperparameters, weight decay on where the factory has it) is checked for:
jit of init and update without recompilation, init state without shared buffers (so params
and state can be donated), stable state shapes and dtypes (float32, bfloat16),
updates with the parameters' tree structure and dtypes, unknown extra arguments ignored,
composition with `optax.masked` and `optax.multi_transform` (same updates as the optimizer on the
trainable leaves alone, no state for frozen leaves), `optax.inject_hyperparams` and schedules,
sharded state on an 8-device mesh keeping its sharding, an Orbax checkpoint round trip, and
a decreasing loss on a small least-squares problem.

Extra arguments follow DESIGN.md: `value=` (MoMo), `obj_fn=` (AdaHessian), `grad_fn=` (SAM, TRAM;
TRAM also takes `trust_region_fn=`).
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpeft.optim.adabelief import adabelief
from jaxpeft.optim.adabound import adabound
from jaxpeft.optim.adahessian import adahessian
from jaxpeft.optim.adam_cm import adam_cm
from jaxpeft.optim.adamod import adamod
from jaxpeft.optim.adopt import adopt
from jaxpeft.optim.came import came
from jaxpeft.optim.cosmos import cosmos
from jaxpeft.optim.exadam import exadam
from jaxpeft.optim.grams import grams
from jaxpeft.optim.mars import mars
from jaxpeft.optim.momo import momo, momo_adam
from jaxpeft.optim.muon import muon
from jaxpeft.optim.optimistic_amsgrad import optimistic_amsgrad
from jaxpeft.optim.sam import sam
from jaxpeft.optim.sania import sania
from jaxpeft.optim.soap import soap
from jaxpeft.optim.swats import swats
from jaxpeft.optim.tram import tram
from jaxpeft.optim.upgd import upgd

Params = dict
LossFn = Callable[[Params], jax.Array]
ExtraArgsFn = Callable[[LossFn, jax.Array], dict]

NUM_DEVICES = 8


def _no_extra_args(loss_fn: LossFn, value: jax.Array) -> dict:
  del loss_fn, value
  return {}


def _value(loss_fn: LossFn, value: jax.Array) -> dict:
  del loss_fn
  return {"value": value}


def _obj_fn(loss_fn: LossFn, value: jax.Array) -> dict:
  del value
  return {"obj_fn": loss_fn}


def _grad_fn(loss_fn: LossFn, value: jax.Array) -> dict:
  del value
  return {"grad_fn": jax.grad(loss_fn)}


def _squared_distance(params: Params, reference: Params) -> jax.Array:
  """A stand-in trust-region distance for TRAM: squared L2 distance in parameter space."""
  return optax.tree.norm(optax.tree.sub(params, reference), squared=True)


def _grad_fn_and_trust_region(loss_fn: LossFn, value: jax.Array) -> dict:
  return {**_grad_fn(loss_fn, value), "trust_region_fn": _squared_distance}


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered optimizer: its factory, small hyperparameters, and its extra update arguments."""

  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict
  extra_args: ExtraArgsFn = _no_extra_args

  def make(self, **overrides) -> optax.GradientTransformation:
    return self.factory(**{**self.kwargs, **overrides})


REGISTRY = {
    "adabelief": Entry(adabelief, dict(learning_rate=1e-2, weight_decay=1e-2)),
    # gamma=0.1: the bounds close within the run, so the clipping is exercised.
    "adabound": Entry(adabound, dict(learning_rate=1e-2, gamma=0.1, weight_decay=1e-2)),
    "amsbound": Entry(adabound, dict(learning_rate=1e-2, gamma=0.1, weight_decay=1e-2, amsbound=True)),
    "adahessian": Entry(adahessian, dict(learning_rate=1e-2, weight_decay=1e-2), _obj_fn),
    # b3=0.9: with the default 0.999 AdaMod's step bound grows too slowly to move in 30 steps.
    "adam_cm": Entry(adam_cm, dict(learning_rate=1e-2, topc=3, weight_decay=1e-2)),
    "adamod": Entry(adamod, dict(learning_rate=1e-2, b3=0.9, weight_decay=1e-2)),
    "adopt": Entry(adopt, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "came": Entry(came, dict(learning_rate=1e-2, weight_decay=1e-2)),
    # rank=2: the dense kernel takes the low-rank + Newton-Schulz step, the other leaves Adam's.
    "cosmos": Entry(cosmos, dict(learning_rate=1e-2, rank=2, weight_decay=1e-2)),
    "exadam": Entry(exadam, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "grams": Entry(grams, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "mars": Entry(mars, dict(learning_rate=1e-2, lr_1d=1e-2, weight_decay=1e-2)),
    "momo": Entry(momo, dict(learning_rate=1.0, weight_decay=1e-2), _value),
    "momo_adam": Entry(momo_adam, dict(learning_rate=1e-1, weight_decay=1e-2), _value),
    # The matrices (dense and conv kernels) take Muon's steps, the vector and scalar AdamW's.
    "muon": Entry(muon, dict(learning_rate=2e-2, weight_decay=1e-2, adam_learning_rate=1e-2)),
    # span=2: the gradient extrapolation starts within the short runs.
    "optimistic_amsgrad": Entry(optimistic_amsgrad, dict(learning_rate=1e-2, weight_decay=1e-2, span=2)),
    "sam": Entry(sam, dict(learning_rate=1e-1, rho=0.05), _grad_fn),
    "sania": Entry(sania, dict(learning_rate=1.0), _value),
    # precondition_frequency=2: the QR refresh of the bases runs within the short runs.
    # max_precondition_dim=7 keeps the 8-long axes unpreconditioned: with an (8, 8) basis sharded
    # over 'data', XLA's propagation (no out_shardings here) re-shards the rotated-space moments of
    # a replicated parameter (see jaxpeft/optim/soap.py); the axes of size 2 and 3 are preconditioned.
    "soap": Entry(
        soap, dict(learning_rate=1e-2, weight_decay=1e-2, precondition_frequency=2, max_precondition_dim=7)
    ),
    "swats": Entry(swats, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "tram": Entry(tram, dict(learning_rate=1e-1), _grad_fn_and_trust_region),
    # The authors' lr=1e-5 is for long continual streams; 30 steps need a larger one.
    "upgd": Entry(upgd, dict(learning_rate=1e-1, weight_decay=1e-3)),
}
NAMES = sorted(REGISTRY)

# Least-squares problem over a nested dict with a matrix, a vector, a conv kernel and a scalar.
_RNG = np.random.default_rng(0)
_X = jnp.asarray(_RNG.normal(size=(32, 16)), jnp.float32)
_Y = jnp.asarray(_RNG.normal(size=(32, 8)), jnp.float32)
_CONV_TARGET = jnp.asarray(_RNG.normal(size=(3, 3, 2, 8)), jnp.float32)
_INITIAL = {
    "dense": {"kernel": 0.1 * _RNG.normal(size=(16, 8)), "bias": np.zeros(8)},
    "conv": {"kernel": 0.1 * _RNG.normal(size=(3, 3, 2, 8))},
    "scale": np.array(1.0),
}
# Trainable leaves under optax.masked / multi_transform (a matrix and the scalar).
MASK = {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": False}, "scale": True}


def initial_params(dtype=jnp.float32) -> Params:
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), _INITIAL)


def loss_fn(params: Params) -> jax.Array:
  p = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  residual = _X @ p["dense"]["kernel"] + p["dense"]["bias"] - _Y
  return jnp.mean(residual**2) + jnp.mean((p["conv"]["kernel"] - _CONV_TARGET) ** 2) + (p["scale"] - 2.0) ** 2


def make_step(tx: optax.GradientTransformation, entry: Entry, loss: LossFn = loss_fn) -> Callable:
  """Jitted `(params, state) -> (params, state, updates, loss)` with the entry's extra args."""

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, **entry.extra_args(loss, value))
    return optax.apply_updates(params, updates), state, updates, value

  return step


@functools.cache
def plain(name: str) -> tuple[optax.GradientTransformation, Callable]:
  """The registry's optimizer and its jitted step, shared between tests to save compiles."""
  entry = REGISTRY[name]
  tx = entry.make()
  return tx, make_step(tx, entry)


def shape_dtype(tree) -> list[tuple[tuple[int, ...], jnp.dtype]]:
  return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


def state_nbytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state))


def assert_trees_equal(a, b) -> None:
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_jit_and_stable_state(name, dtype):
  tx, step = plain(name)
  params = initial_params(dtype)
  state = jax.jit(tx.init)(params)
  expected = shape_dtype(state)
  compiled_before = step._cache_size()
  for i in range(3):
    params, state, updates, _ = step(params, state)
    assert shape_dtype(state) == expected, f"state shapes/dtypes changed at step {i + 1}"
    chex.assert_trees_all_equal_structs(updates, params)
    chex.assert_trees_all_equal_dtypes(updates, initial_params(dtype))
    chex.assert_trees_all_equal_dtypes(params, initial_params(dtype))
    chex.assert_tree_all_finite(params)
  assert step._cache_size() - compiled_before <= 1, "update recompiled between steps"


@pytest.mark.parametrize("name", NAMES)
def test_init_state_buffers_are_distinct(name):
  """Train steps donate params and state (`jax.jit(..., donate_argnums)`), which XLA rejects when
  one buffer appears twice among the donated arguments: init must not reuse an array in two state
  fields nor put a parameter array itself into the state."""
  tx, _ = plain(name)
  params = initial_params()
  state = tx.init(params)
  seen = {x.unsafe_buffer_pointer(): "params" for x in jax.tree.leaves(params)}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if x.size == 0:
      continue
    pointer = x.unsafe_buffer_pointer()
    assert pointer not in seen, f"state leaf {_path(path)} shares its buffer with {seen[pointer]}"
    seen[pointer] = f"state leaf {_path(path)}"


@pytest.mark.parametrize("name", NAMES)
def test_ignores_unknown_extra_args(name):
  """optax.chain forwards every extra argument to every member, so unknown ones must be ignored."""
  tx, _ = plain(name)
  entry = REGISTRY[name]
  params = initial_params()
  value, grads = jax.value_and_grad(loss_fn)(params)
  extra = entry.extra_args(loss_fn, value)
  updates, _ = tx.update(grads, tx.init(params), params, **extra, unknown_extra_arg=jnp.ones(3))
  chex.assert_trees_all_equal_structs(updates, params)
  chex.assert_tree_all_finite(updates)


def _path(keypath) -> str:
  return jax.tree_util.keystr(keypath)


def _trainable_subset(tree) -> dict:
  """The trainable leaves as a flat dict keyed by path (an independently structured tree)."""
  flat_mask = {_path(k): m for k, m in jax.tree_util.tree_flatten_with_path(MASK)[0]}
  return {_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(tree)[0] if flat_mask[_path(k)]}


def _masked_loss(frozen: Params) -> LossFn:
  """The loss as a function of the tree an optax.masked inner transform sees (MaskedNode leaves)."""
  return lambda inner: loss_fn(jax.tree.map(lambda m, p, f: p if m else f, MASK, inner, frozen))


def _subset_loss(frozen: Params) -> LossFn:
  """The loss as a function of the trainable subset alone."""
  return lambda subset: loss_fn(jax.tree_util.tree_map_with_path(lambda k, f: subset.get(_path(k), f), frozen))


def _run_wrapped(wrapped: optax.GradientTransformation, entry: Entry, num_steps: int):
  """Steps `wrapped` applying only the trainable updates; returns (updates per step, state)."""
  frozen = initial_params()
  inner_loss = _masked_loss(frozen)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = wrapped.update(grads, state, params, **entry.extra_args(inner_loss, value))
    trainable_updates = jax.tree.map(lambda m, u: u if m else jnp.zeros_like(u), MASK, updates)
    return optax.apply_updates(params, trainable_updates), state, updates, grads

  params, state = frozen, wrapped.init(frozen)
  history = []
  for _ in range(num_steps):
    params, state, updates, grads = step(params, state)
    history.append((updates, grads))
  return history, state


def _run_on_subset(entry: Entry, num_steps: int):
  """The same optimizer on the trainable leaves only: the reference for the wrapped runs."""
  tx = entry.make()
  subset = _trainable_subset(initial_params())
  sub_loss = _subset_loss(initial_params())
  step = make_step(tx, entry, sub_loss)
  state = tx.init(subset)
  history = []
  for _ in range(num_steps):
    subset, state, updates, _ = step(subset, state)
    history.append(updates)
  return history, state


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
@pytest.mark.parametrize("name", NAMES)
def test_masked_and_multi_transform(name, wrapper):
  entry = REGISTRY[name]
  if wrapper == "masked":
    wrapped = optax.masked(entry.make(), MASK)
  else:
    labels = jax.tree.map(lambda m: "train" if m else "frozen", MASK)
    wrapped = optax.multi_transform({"train": entry.make(), "frozen": optax.set_to_zero()}, labels)
  history, state = _run_wrapped(wrapped, entry, num_steps=3)
  reference, reference_state = _run_on_subset(entry, num_steps=3)
  for i, ((updates, grads), expected) in enumerate(zip(history, reference)):
    chex.assert_trees_all_close(
        _trainable_subset(updates),
        expected,
        rtol=1e-5,
        atol=1e-7,
        custom_message=f"trainable updates differ from the unwrapped optimizer at step {i + 1}",
    )
    frozen = jax.tree.map(lambda m, u, g: None if m else (u, g), MASK, updates, grads)
    for u, g in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, tuple)):
      # optax.masked passes frozen leaves through; multi_transform's set_to_zero zeroes them.
      np.testing.assert_array_equal(u, g if wrapper == "masked" else np.zeros_like(g))
  assert state_nbytes(state) == state_nbytes(reference_state), "frozen leaves hold optimizer state"


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_and_schedule(name):
  """A schedule given to the factory matches the same schedule injected by optax, step by step.

  `optax.inject_hyperparams` evaluates the schedule at its own step count and passes every numeric
  hyperparameter (defaults included) to the factory as a float32 jnp scalar. The factory is given
  the same jnp scalars (so both sides round e.g. 1 - b2 alike) plus the schedule itself; equal
  updates show that no hyperparameter is used in Python control flow and that the factory
  evaluates the schedule at the same steps (0 on the first update).
  """
  entry = REGISTRY[name]
  schedule = optax.exponential_decay(entry.kwargs["learning_rate"], transition_steps=1, decay_rate=0.5)
  injected = optax.inject_hyperparams(entry.factory)(**{**entry.kwargs, "learning_rate": schedule})
  params = initial_params()
  state_b = injected.init(params)
  arguments = inspect.signature(entry.factory).bind(**entry.kwargs)
  arguments.apply_defaults()
  as_injected = {
      k: v for k, v in state_b.hyperparams.items() if k != "learning_rate" and not callable(arguments.arguments[k])
  }
  scheduled = entry.make(**as_injected, learning_rate=schedule)
  params_a, state_a, params_b = params, scheduled.init(params), params
  step_a, step_b = make_step(scheduled, entry), make_step(injected, entry)
  for i in range(3):
    params_a, state_a, updates_a, _ = step_a(params_a, state_a)
    params_b, state_b, updates_b, _ = step_b(params_b, state_b)
    chex.assert_trees_all_close(updates_a, updates_b, rtol=1e-5, atol=1e-7, custom_message=f"step {i + 1}")


def _data_sharding(mesh: Mesh, x: jax.Array) -> NamedSharding:
  """PartitionSpec('data') on the leading axis when it divides evenly, else replicated."""
  divisible = jnp.ndim(x) >= 1 and jnp.shape(x)[0] > 0 and jnp.shape(x)[0] % NUM_DEVICES == 0
  return NamedSharding(mesh, PartitionSpec("data") if divisible else PartitionSpec())


@pytest.mark.parametrize("name", NAMES)
def test_sharded_state_keeps_sharding(name):
  assert jax.device_count() == NUM_DEVICES, "tests/conftest.py should provide 8 fake CPU devices"
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx, step = plain(name)
  params = initial_params()
  params = jax.device_put(params, jax.tree.map(functools.partial(_data_sharding, mesh), params))
  state = tx.init(params)
  state = jax.device_put(state, jax.tree.map(functools.partial(_data_sharding, mesh), state))
  assert any(not s.sharding.is_fully_replicated for s in jax.tree.leaves(params))
  for i in range(2):
    new_params, new_state, _, _ = step(params, state)
    for tree, new_tree, what in ((params, new_params, "parameter"), (state, new_state, "state")):
      for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(new_tree)):
        assert new.sharding.is_equivalent_to(old.sharding, old.ndim), (
            f"step {i + 1}: {what} leaf {_path(path)} {old.shape} went from {old.sharding.spec} "
            f"to {getattr(new.sharding, 'spec', new.sharding)}"
        )
    params, state = new_params, new_state


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
  tx, step = plain(name)
  params = initial_params()
  state = tx.init(params)
  params, state, _, _ = step(params, state)  # a non-trivial state
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(tx.init, params))
  checkpointer.close()
  assert_trees_equal(restored, state)
  expected_params, expected_state, _, _ = step(params, state)
  resumed_params, resumed_state, _, _ = step(params, restored)
  assert_trees_equal(resumed_params, expected_params)
  assert_trees_equal(resumed_state, expected_state)


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases(name):
  tx, step = plain(name)
  params = initial_params()
  state = tx.init(params)
  losses = []
  for _ in range(30):
    params, state, _, value = step(params, state)
    losses.append(float(value))
  final = float(loss_fn(params))
  assert np.all(np.isfinite(losses))
  assert final < 0.9 * losses[0], f"loss went from {losses[0]:.4f} to {final:.4f} in 30 steps"
