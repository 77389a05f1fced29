"""AdamCM against a float64 torch transcription of the authors' Adam_CM (CMOptimizer) step."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxpeft.optim.adam_cm import adam_cm
from tests.optim.reference import (
    EXACT_SCHEDULE,
    assert_low_precision_tracks_float64,
    assert_trajectories_close,
    random_problem,
    run_optax,
)

SHAPES = {"bias": (5,), "kernel": (4, 3), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 2.0**-6

SETTINGS = {
    "defaults": {},
    "weight_decay_small_buffer": {"weight_decay": 0.1, "topc": 2, "decay": 0.9},
    "other_betas_eps": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "topc": 3, "decay": 0.5},
}


def official(
    params, grads, learning_rates, b1=0.9, b2=0.999, eps=1e-8, decay=0.7, topc=5, weight_decay=0.0, inserted=None
):
  """The authors' Adam_CM step (synced, critical_test=0) in torch float64; params after each step.

  The buffer is a list of [priority, tensors] with an incrementally maintained sum, as in their
  TensorList. `inserted` (a list) receives whether each step inserted into the buffer.
  """
  p = {k: torch.tensor(v) for k, v in params.items()}
  m = {k: torch.zeros_like(v) for k, v in p.items()}
  v = {k: torch.zeros_like(x) for k, x in p.items()}
  keys, items = [], []
  total = {k: torch.zeros_like(x) for k, x in p.items()}
  smallest = 0
  trajectory = []
  for step, (g_np, lr) in enumerate(zip(grads, learning_rates), start=1):
    g = {k: torch.tensor(x) for k, x in g_np.items()}
    norm = sum(torch.sqrt(torch.sum(torch.square(x))) for x in g.values())
    for k in p:
      p[k] = p[k] * (1 - lr * weight_decay)
    if step == 1:
      keys.append(norm)
      items.append({k: x.clone() for k, x in g.items()})
      total = {k: total[k] + g[k] for k in p}
      aggregate = m
      did_insert = True
    else:
      m = {k: b1 * m[k] + (1 - b1) * g[k] for k in p}
      aggregate = {k: m[k] + total[k] / len(items) for k in p}
      did_insert = False
      if len(items) == topc:
        smallest = int(torch.argmin(torch.stack(keys)))
        if norm > keys[smallest]:
          total = {k: total[k] - items[smallest][k] + m[k] for k in p}
          keys[smallest], items[smallest] = norm, {k: x.clone() for k, x in m.items()}
          did_insert = True
      else:
        keys.append(norm)
        items.append({k: x.clone() for k, x in m.items()})
        total = {k: total[k] + m[k] for k in p}
        did_insert = True
    if inserted is not None:
      inserted.append(did_insert)
    for k in p:
      v[k] = b2 * v[k] + (1 - b2) * aggregate[k] * aggregate[k]
      denom = v[k].sqrt() / (1 - b2**step) ** 0.5 + eps
      p[k] = p[k] - lr / (1 - b1**step) * aggregate[k] / denom
    keys = [key * decay for key in keys]
    trajectory.append({k: x.numpy().copy() for k, x in p.items()})
  return trajectory


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_authors_code(setting):
  kw = SETTINGS[setting]
  params, grads = random_problem(SHAPES, NUM_STEPS)
  ref = official(params, grads, [LR] * NUM_STEPS, **kw)
  assert_trajectories_close(run_optax(adam_cm(LR, **kw), params, grads), ref)


def test_replacement_is_exercised():
  """Once full, the buffer both accepts and rejects momenta in these runs."""
  params, grads = random_problem(SHAPES, NUM_STEPS)
  inserted = []
  official(params, grads, [LR] * NUM_STEPS, topc=2, decay=0.9, inserted=inserted)
  assert not all(inserted[2:]) and any(inserted[2:])


def test_schedule_and_inject_hyperparams():
  params, grads = random_problem(SHAPES, NUM_STEPS)
  lrs = [float(EXACT_SCHEDULE(i)) for i in range(NUM_STEPS)]
  ref = official(params, grads, lrs, weight_decay=0.1)
  assert_trajectories_close(run_optax(adam_cm(EXACT_SCHEDULE, weight_decay=0.1), params, grads), ref)
  injected = optax.inject_hyperparams(adam_cm, static_args="topc")(EXACT_SCHEDULE, weight_decay=0.1)
  assert_trajectories_close(run_optax(injected, params, grads), ref, atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision(dtype, atol):
  params, grads = random_problem(SHAPES, 10)
  assert_low_precision_tracks_float64(adam_cm(LR), params, grads, dtype, atol)


@pytest.mark.parametrize(
    "kw, match",
    [({"b1": 1.0}, "b1 must be in"), ({"topc": 0}, "topc must be > 0"), ({"decay": 1.5}, "decay must be in")],
)
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    adam_cm(**{"learning_rate": LR, **kw})
