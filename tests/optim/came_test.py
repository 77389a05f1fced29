"""CAME against the authors' came-pytorch 0.1.3 and pytorch_optimizer.CAME, step by step."""

import math

import came_pytorch
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_optimizer
import torch

from jaxpeft.optim.came import came
from tests.optim import reference

# A vector, a matrix, a 4-D tensor and a scalar: factored and unfactored paths. These tests hand the
# reference the same arrays, so they factor the last two axes as stored ("last_two"); the Flax-layout
# default is tested below with the conv kernel transposed to PyTorch's layout for the reference.
SHAPES = {"bias": (5,), "dense": (6, 4), "conv": (3, 3, 2, 4), "scale": ()}
NUM_STEPS = 25
LR = 1e-2
RAW = dict(factored_axes="last_two")
TO_TORCH = (3, 2, 0, 1)  # Flax conv kernel (kh, kw, I, O) -> PyTorch weight (O, I, kh, kw)


def authors(**kwargs):
  return lambda tensors: came_pytorch.CAME(tensors, **kwargs)


@pytest.mark.parametrize(
    "ours, ref",
    [
        (dict(), dict()),
        (dict(weight_decay=0.1), dict(weight_decay=0.1)),
        (
            dict(b1=0.8, b2=0.99, b3=0.999, eps=1e-20, eps_res=1e-8, clip_threshold=0.5),
            dict(betas=(0.8, 0.99, 0.999), eps=(1e-20, 1e-8), clip_threshold=0.5),
        ),
        # A huge threshold: the RMS clip never fires.
        (dict(clip_threshold=1e6), dict(clip_threshold=1e6)),
    ],
    ids=["defaults", "weight_decay", "custom_betas_eps_clip", "no_clip"],
)
def test_matches_authors(ours, ref):
  params, grads = reference.random_problem(SHAPES, NUM_STEPS)
  expected = reference.run_torch(authors(lr=LR, **ref), params, grads)
  reference.assert_trajectories_close(reference.run_optax(came(LR, **ours, **RAW), params, grads), expected)


@pytest.mark.parametrize("weight_decouple", [True, False])
def test_matches_pytorch_optimizer(weight_decouple):
  params, grads = reference.random_problem(SHAPES, NUM_STEPS, seed=1)
  expected = reference.run_torch(
      lambda t: pytorch_optimizer.CAME(t, lr=LR, weight_decay=0.1, weight_decouple=weight_decouple, foreach=False),
      params,
      grads,
  )
  tx = came(LR, weight_decay=0.1, weight_decouple=weight_decouple, **RAW)
  reference.assert_trajectories_close(reference.run_optax(tx, params, grads), expected)


def test_coupled_weight_decay_differs_from_decoupled():
  # Guards the test above: the switch must change the trajectory, or it would test nothing.
  params, grads = reference.random_problem(SHAPES, 5, seed=1)
  coupled = reference.run_optax(came(LR, weight_decay=0.1, weight_decouple=False), params, grads)
  decoupled = reference.run_optax(came(LR, weight_decay=0.1), params, grads)
  assert np.abs(coupled[-1]["dense"] - decoupled[-1]["dense"]).max() > 1e-4


@pytest.mark.parametrize("grad_scale", [0.0, 1e30], ids=["zero", "huge"])
def test_extreme_gradients_match_authors(grad_scale):
  reference.assert_follows_torch(
      came(LR, weight_decay=0.1, **RAW),
      authors(lr=LR, weight_decay=0.1),
      SHAPES,
      NUM_STEPS,
      seed=2,
      grad_scale=grad_scale,
  )


def test_schedule_and_inject_hyperparams_match_authors():
  # b3 (the default) passed explicitly: inject_hyperparams also injects a float hyperparameter.
  reference.assert_schedule_follows_torch(
      came,
      authors(lr=1.0, weight_decay=0.1),
      reference.EXACT_SCHEDULE,
      SHAPES,
      NUM_STEPS,
      seed=3,
      weight_decay=0.1,
      b3=0.9999,
      **RAW,
  )


def test_factored_state_sizes_grow_with_rows_plus_cols():
  shapes = {"dense": (64, 32), "conv": (3, 3, 16, 32), "bias": (32,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = came(1e-3, **RAW).init(params)[0]
  size = lambda tree: {k: v.size for k, v in tree.items()}
  # Statistics a leaf does not use are one-element placeholders.
  assert size(state.nu_row) == {"dense": 64, "conv": 3 * 3 * 16, "bias": 1}
  assert size(state.nu_col) == {"dense": 32, "conv": 3 * 3 * 32, "bias": 1}
  assert size(state.res_row) == size(state.nu_row) and size(state.res_col) == size(state.nu_col)
  assert size(state.nu) == {"dense": 1, "conv": 1, "bias": 32}
  assert size(state.mu) == {k: math.prod(s) for k, s in shapes.items()}

  # Same statistics shapes as the authors' optimizer keeps.
  tensors = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
  torch_opt = came_pytorch.CAME(list(tensors.values()), lr=1e-3)
  for t in tensors.values():
    t.grad = torch.ones_like(t)
  torch_opt.step()
  for k, t in tensors.items():
    torch_state = torch_opt.state[t]
    if "exp_avg_sq_row" in torch_state:
      for ours, theirs in [
          ("nu_row", "exp_avg_sq_row"),
          ("nu_col", "exp_avg_sq_col"),
          ("res_row", "exp_avg_res_row"),
          ("res_col", "exp_avg_res_col"),
      ]:
        assert getattr(state, ours)[k].shape == tuple(torch_state[theirs].shape), (k, ours)
    else:
      assert state.nu[k].shape == tuple(torch_state["exp_avg_sq"].shape), k


def _flax_conv_against_authors(tx, shapes, layouts, seed):
  """Runs `tx` on Flax-layout leaves and came-pytorch on the same leaves in PyTorch's layout."""
  params, grads = reference.random_problem(shapes, 8, seed=seed)
  to_torch = lambda tree: {k: v.transpose(layouts[k]) if k in layouts else v for k, v in tree.items()}
  back = lambda tree: {k: v.transpose(np.argsort(layouts[k])) if k in layouts else v for k, v in tree.items()}
  expected = [
      back(p)
      for p in reference.run_torch(
          authors(lr=LR, weight_decay=0.1), to_torch(params), [to_torch(g) for g in grads]
      )
  ]
  ours = reference.run_optax(tx, params, grads)
  reference.assert_trajectories_close(ours, expected)
  return ours


def test_conv_kernel_factors_the_axes_the_authors_factor_on_the_same_layer():
  """came-pytorch on a conv weight (O, I, kh, kw) factors (kh, kw): so does the default on (kh, kw, I, O)."""
  shapes = {"conv": (3, 3, 2, 4), "conv3d": (2, 3, 3, 2, 4), "dense": (6, 4), "bias": (4,)}
  layouts = {"conv": TO_TORCH, "conv3d": (4, 3, 0, 1, 2), "dense": (1, 0)}
  ours = _flax_conv_against_authors(came(LR, weight_decay=0.1), shapes, layouts, seed=5)
  raw = reference.run_optax(came(LR, weight_decay=0.1, **RAW), *reference.random_problem(shapes, 8, seed=5))
  assert np.abs(raw[-1]["conv"] - ours[-1]["conv"]).max() > 1e-4  # the axes matter
  state = came(LR).init({"conv": jnp.zeros((3, 3, 2, 4))})[0]
  assert state.nu_row["conv"].shape == (2, 4, 3) and state.nu_col["conv"].shape == (2, 4, 3)  # batch (I, O)


def test_callable_factored_axes_fold_a_dense_general_kernel_as_its_torch_linear():
  """A (D, heads, D/heads) query kernel is a (heads*D/heads, D) Linear weight in torch: fold the output axes."""
  fold = lambda path, shape: ((0,), (1, 2)) if path == "query" else None
  params, grads = reference.random_problem({"query": (4, 2, 3), "bias": (6,)}, 8, seed=6)
  as_linear = lambda tree: {"query": tree["query"].reshape(4, 6).T, "bias": tree["bias"]}
  expected = reference.run_torch(authors(lr=LR), as_linear(params), [as_linear(g) for g in grads])
  ours = reference.run_optax(came(LR, factored_axes=fold), params, grads)
  reference.assert_trajectories_close([as_linear(p) for p in ours], expected)
  with pytest.raises(ValueError, match="factored_axes gave"):
    came(LR, factored_axes=lambda path, shape: (0, 0)).init({"w": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="factored_axes='torch'"):
    came(LR, factored_axes="torch")


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_low_precision_keeps_dtype_and_tracks_float64(dtype, atol):
  params, grads = reference.random_problem(SHAPES, 10, seed=4)
  reference.assert_low_precision_tracks_float64(came(LR, weight_decay=0.1), params, grads, dtype, atol)


def test_mu_dtype():
  params = {"dense": jnp.zeros((4, 3), jnp.bfloat16)}
  state = came(1e-3, mu_dtype=jnp.float32).init(params)[0]
  assert state.mu["dense"].dtype == jnp.float32 and state.nu_row["dense"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(b2=1.5), "b2"), (dict(eps_res=-1.0), "eps_res"), (dict(clip_threshold=0.0), "clip_threshold")],
)
def test_bad_hyperparameters_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    came(1e-3, **kwargs)
