"""Grams against the authors' grams-pytorch 0.0.2 and pytorch_optimizer.Grams, step by step."""

import grams as grams_pytorch  # the authors' package installs a top-level module `grams`
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_optimizer

from jaxpeft.optim.grams import grams
from tests.optim import reference

SHAPES = {"bias": (5,), "dense": (6, 4), "conv": (3, 3, 2, 4)}
NUM_STEPS = 25
LR = 1e-2
# Gradients of size ~1e-5 make sqrt(v) comparable to eps = 1e-6, so where eps goes matters.
SMALL = 1e-5


def authors(**kwargs):
  return lambda tensors: grams_pytorch.Grams(tensors, **kwargs)


@pytest.mark.parametrize("grad_scale", [1.0, SMALL])
@pytest.mark.parametrize(
    "ours, ref",
    [
        (dict(), dict()),
        (dict(weight_decay=0.1), dict(weight_decay=0.1)),
        (dict(b1=0.8, b2=0.99, eps=1e-3), dict(betas=(0.8, 0.99), eps=1e-3)),
        (dict(correct_bias=False), dict(correct_bias=False)),
    ],
    ids=["defaults", "weight_decay", "custom_betas_eps", "no_bias_correction"],
)
def test_matches_authors(ours, ref, grad_scale):
  params, grads = reference.random_problem(SHAPES, NUM_STEPS, grad_scale=grad_scale)
  expected = reference.run_torch(authors(lr=LR, **ref), params, grads)
  reference.assert_trajectories_close(reference.run_optax(grams(LR, **ours), params, grads), expected)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_eps_after_bias_correction_matches_pytorch_optimizer(weight_decay):
  params, grads = reference.random_problem(SHAPES, NUM_STEPS, seed=1, grad_scale=SMALL)
  expected = reference.run_torch(
      lambda t: pytorch_optimizer.Grams(t, lr=LR, weight_decay=weight_decay, foreach=False), params, grads
  )
  tx = grams(LR, weight_decay=weight_decay, eps_after_bias_correction=True)
  reference.assert_trajectories_close(reference.run_optax(tx, params, grads), expected)


def test_documented_eps_offset_between_references():
  """First step in closed form: authors' g / (|g| + eps / sqrt(1 - b2)), others' g / (|g| + eps)."""
  b2, eps = 0.999, 1e-6
  params, grads = reference.random_problem(SHAPES, 1, seed=2, grad_scale=SMALL)
  g = grads[0]
  for tx, eps_hat in [(grams(LR), eps / np.sqrt(1 - b2)), (grams(LR, eps_after_bias_correction=True), eps)]:
    (ours,) = reference.run_optax(tx, params, grads)
    for k in params:
      np.testing.assert_allclose(ours[k], params[k] - LR * g[k] / (np.abs(g[k]) + eps_hat), rtol=1e-12, err_msg=k)
  # The offset is not negligible at this gradient scale: the two references really differ.
  authors_run = reference.run_torch(authors(lr=LR), params, grads)[0]["dense"]
  others_run = reference.run_torch(lambda t: pytorch_optimizer.Grams(t, lr=LR), params, grads)[0]["dense"]
  assert np.abs(authors_run - others_run).max() > 0.1 * LR


@pytest.mark.parametrize("grad_scale", [0.0, 1e30], ids=["zero", "huge"])
def test_extreme_gradients_match_authors(grad_scale):
  reference.assert_follows_torch(
      grams(LR, weight_decay=0.1),
      authors(lr=LR, weight_decay=0.1),
      SHAPES,
      NUM_STEPS,
      seed=3,
      grad_scale=grad_scale,
  )


def test_schedule_and_inject_hyperparams_match_authors():
  # b2 and eps (the defaults) passed explicitly: inject_hyperparams also injects float hyperparameters.
  reference.assert_schedule_follows_torch(
      grams,
      authors(lr=1.0, weight_decay=0.1),
      reference.EXACT_SCHEDULE,
      SHAPES,
      NUM_STEPS,
      seed=4,
      grad_scale=SMALL,
      weight_decay=0.1,
      b2=0.999,
      eps=1e-6,
  )


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_low_precision_keeps_dtype_and_tracks_float64(dtype, atol):
  params, grads = reference.random_problem(SHAPES, 10, seed=5)
  reference.assert_low_precision_tracks_float64(grams(LR, weight_decay=0.1), params, grads, dtype, atol)


def test_mu_dtype():
  params = {"dense": jnp.zeros((4, 3), jnp.bfloat16)}
  state = grams(mu_dtype=jnp.float32).init(params)[0]
  assert state.mu["dense"].dtype == jnp.float32 and state.nu["dense"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, message", [(dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps")])
def test_bad_hyperparameters_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    grams(1e-3, **kwargs)
