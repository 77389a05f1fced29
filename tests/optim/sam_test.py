"""Tests for jaxpeft.optim.sam against pytorch_optimizer.SAM, optax.contrib.sam and ASAM's formula.

The problem is a small convolutional classifier (a 4-D OIHW conv kernel, a dense matrix and a
bias) with a new batch at every step; both sides compute the gradient and the gradient at the
perturbed point of the same loss, in float64, from the same start.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from pytorch_optimizer import SAM as TorchSAM

from jaxpeft.optim.sam import sam, sam_perturbation, scale_by_sam
from tests.optim.reference import assert_trajectories_close

NUM_STEPS = 20
SHAPES = {"kernel": (4, 2, 2, 2), "w": (4, 3), "b": (3,)}
# pytorch_optimizer.SAM accumulates the global gradient norm in float32 even for float64 params
# (utils.gradient.get_global_gradient_norm casts the per-tensor norms with `.float()`), so its
# perturbation carries a ~1e-7 relative rounding error; over 20 steps that moves parameters by up
# to a few 1e-9. Entries that pass near zero need this absolute slack; everything else is held to
# rtol=1e-6. The float64 references (ASAM formula, optax.contrib.sam) use atol=1e-12.
TORCH_SAM_ATOL = 1e-8


def make_problem(num_steps: int = NUM_STEPS, batch: int = 6, seed: int = 0):
  """Initial params and one (images, labels) batch per step, float64 numpy."""
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  batches = [(rng.normal(size=(batch, 2, 4, 4)), rng.integers(0, 3, size=batch)) for _ in range(num_steps)]
  return params, batches


def jax_loss(params, batch, scale=1.0):
  images, labels = batch
  conv = jax.lax.conv_general_dilated(
      images, params["kernel"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
  )
  logits = jnp.tanh(conv).mean(axis=(2, 3)) @ params["w"] + params["b"]
  logp = jax.nn.log_softmax(logits)
  return -scale * jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def torch_loss(params, batch, scale=1.0):
  images, labels = batch
  conv = F.conv2d(torch.as_tensor(images), params["kernel"])
  logits = torch.tanh(conv).mean(dim=(2, 3)) @ params["w"] + params["b"]
  return scale * F.cross_entropy(logits, torch.as_tensor(labels))


def run_ours(tx, params, batches, loss=jax_loss, dtype=jnp.float64, axis_name=None):
  """Our optimizer, jitted step, `grad_fn` = gradient on the step's batch; params after each step."""
  with jax.enable_x64(True):
    p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state, batch):
      grad_fn = lambda q: jax.grad(loss)(q, batch)
      updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
      return optax.apply_updates(p, updates), state

    trajectory = []
    for images, labels in batches:
      p, state = step(p, state, (jnp.asarray(images, dtype), jnp.asarray(labels)))
      trajectory.append({k: np.asarray(v) for k, v in p.items()})
  return trajectory


def run_torch_sam(make_optimizer, params, batches, loss=torch_loss):
  """A closure-based torch SAM optimizer (float64) on the same batches."""
  tensors = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
  opt = make_optimizer(list(tensors.values()))
  trajectory = []
  for batch in batches:

    def closure():
      opt.zero_grad()
      value = loss(tensors, batch)
      value.backward()
      return value

    closure()
    opt.step(closure)
    trajectory.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
  return trajectory


def run_sam_formula(params, batches, lr, rho, adaptive=False, eta=0.0, loss=torch_loss):
  """SAM / ASAM with plain SGD written out in torch float64 from the papers' formulas.

  e = rho T^2 g / (||T g|| + 1e-12) with T = 1 (Foret et al. 2021) or T = |w| + eta (Kwon et al.
  2021); w <- w - lr * grad L(w + e).
  """
  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
  trajectory = []
  for batch in batches:
    grads = torch.autograd.grad(loss(tensors, batch), list(tensors.values()))
    with torch.no_grad():
      t_w = [t.abs() + eta if adaptive else torch.ones_like(t) for t in tensors.values()]
      norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(t_w, grads)))
      perturbed = {
          k: (w + rho * t * t * g / (norm + 1e-12)).requires_grad_()
          for (k, w), t, g in zip(tensors.items(), t_w, grads)
      }
    sam_grads = torch.autograd.grad(loss(perturbed, batch), list(perturbed.values()))
    with torch.no_grad():
      for w, g in zip(tensors.values(), sam_grads):
        w -= lr * g
    trajectory.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
  return trajectory


def assert_moves(trajectory, params, min_change=1e-3):
  """Guards against vacuous comparisons: the parameters really changed."""
  change = max(np.max(np.abs(trajectory[-1][k] - params[k])) for k in params)
  assert change > min_change, f"parameters barely moved ({change})"


@pytest.mark.parametrize(
    "adaptive, rho, momentum, weight_decay",
    [(False, 0.05, 0.0, 0.0), (False, 0.3, 0.9, 1e-2), (True, 0.5, 0.9, 0.0), (True, 2.0, 0.0, 1e-2)],
)
def test_matches_pytorch_optimizer_sam_with_sgd(adaptive, rho, momentum, weight_decay):
  params, batches = make_problem()
  lr = 0.1
  base = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum or None))
  ours = run_ours(sam(rho=rho, adaptive=adaptive, base_optimizer=base), params, batches)
  ref = run_torch_sam(
      lambda ps: TorchSAM(
          ps,
          torch.optim.SGD,
          rho=rho,
          adaptive=adaptive,
          lr=lr,
          momentum=momentum,
          weight_decay=weight_decay,
      ),
      params,
      batches,
  )
  assert_moves(ref, params)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=TORCH_SAM_ATOL)


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_pytorch_optimizer_sam_with_adamw(adaptive):
  params, batches = make_problem()
  base = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
  ours = run_ours(sam(rho=0.1, adaptive=adaptive, base_optimizer=base), params, batches)
  ref = run_torch_sam(
      lambda ps: TorchSAM(
          ps,
          torch.optim.AdamW,
          rho=0.1,
          adaptive=adaptive,
          lr=1e-2,
          betas=(0.9, 0.999),
          eps=1e-8,
          weight_decay=1e-2,
      ),
      params,
      batches,
  )
  assert_moves(ref, params)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=TORCH_SAM_ATOL)


def test_asam_eta_matches_paper_formula():
  params, batches = make_problem()
  ours = run_ours(sam(0.1, rho=0.5, adaptive=True, eta=0.01), params, batches)
  ref = run_sam_formula(params, batches, lr=0.1, rho=0.5, adaptive=True, eta=0.01)
  no_eta = run_sam_formula(params, batches, lr=0.1, rho=0.5, adaptive=True, eta=0.0)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)
  # eta matters on this problem, so the comparison above checks it.
  assert np.max(np.abs(ref[-1]["w"] - no_eta[-1]["w"])) > 1e-4


@pytest.mark.parametrize("learning_rate", [0.1, optax.linear_schedule(0.2, 0.01, transition_steps=NUM_STEPS)])
def test_matches_optax_contrib_sam_opaque_mode(learning_rate):
  params, batches = make_problem()
  rho = 0.2
  ref_tx = optax.contrib.sam(
      optax.sgd(learning_rate),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2,
      opaque_mode=True,
  )

  def run_ref():
    with jax.enable_x64(True):
      p = {k: jnp.asarray(v) for k, v in params.items()}
      state = ref_tx.init(p)

      @jax.jit
      def step(p, state, batch):
        grad_fn = lambda q, _: jax.grad(jax_loss)(q, batch)
        updates, state = ref_tx.update(grad_fn(p, 0), state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), state

      out = []
      for images, labels in batches:
        p, state = step(p, state, (jnp.asarray(images), jnp.asarray(labels)))
        out.append({k: np.asarray(v) for k, v in p.items()})
      return out

  ref = run_ref()
  assert_moves(ref, params)
  assert_trajectories_close(run_ours(sam(learning_rate, rho=rho), params, batches), ref, rtol=1e-6)


def test_pmap_axis_name_equals_single_device_full_batch():
  num_devices = jax.local_device_count()
  assert num_devices >= 2, "conftest should give 8 CPU devices"
  params, batches = make_problem(num_steps=5, batch=2 * num_devices)
  for adaptive in (False, True):
    tx_single = sam(0.1, rho=0.3, adaptive=adaptive, eta=0.01)
    tx_multi = sam(0.1, rho=0.3, adaptive=adaptive, eta=0.01, axis_name="batch")
    single = run_ours(tx_single, params, batches)
    with jax.enable_x64(True):
      p = {k: jnp.asarray(np.broadcast_to(v, (num_devices, *v.shape))) for k, v in params.items()}
      state = jax.pmap(tx_multi.init)(p)

      def step(p, state, batch):
        grad_fn = lambda q: jax.grad(jax_loss)(q, batch)  # gradient on this device's shard only
        updates, state = tx_multi.update(grad_fn(p), state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), state

      pstep = jax.pmap(step, axis_name="batch")
      for i, (images, labels) in enumerate(batches):
        shard = (
            jnp.asarray(images.reshape(num_devices, -1, *images.shape[1:])),
            jnp.asarray(labels.reshape(num_devices, -1)),
        )
        p, state = pstep(p, state, shard)
        for k in params:
          for d in range(num_devices):
            np.testing.assert_allclose(np.asarray(p[k][d]), single[i][k], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol, atol", [(jnp.float32, 1e-4, 1e-5), (jnp.bfloat16, 0.0, 0.1)])
def test_low_precision_keeps_dtype_and_tracks_float64(dtype, rtol, atol):
  params, batches = make_problem(num_steps=5)
  tx = sam(0.1, rho=0.5, adaptive=True, eta=0.01)
  ref = run_ours(tx, params, batches)
  low = run_ours(tx, params, batches, dtype=dtype)
  for step_low, step_ref in zip(low, ref):
    for k in params:
      assert step_low[k].dtype == dtype
      assert np.all(np.isfinite(step_low[k].astype(np.float32)))
  for k in params:
    np.testing.assert_allclose(low[-1][k].astype(np.float64), ref[-1][k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradients_leave_params_unchanged(adaptive):
  params, batches = make_problem(num_steps=3)
  zero_loss = lambda p, batch: 0.0 * jax_loss(p, batch)
  out = run_ours(sam(0.1, adaptive=adaptive), params, batches, loss=zero_loss)
  for step in out:
    for k in params:
      np.testing.assert_array_equal(step[k], params[k])


@pytest.mark.parametrize("adaptive", [False, True])
def test_huge_gradients_match_float64_formula_without_nan(adaptive):
  # pytorch_optimizer.SAM is no reference here: it squares the gradient norm in float32, which
  # overflows to inf for norms above ~1.8e19, so its perturbation silently becomes zero.
  params, batches = make_problem()
  scale, lr = 1e30, 1e-31
  ours = run_ours(
      sam(lr, rho=0.3, adaptive=adaptive), params, batches, loss=functools.partial(jax_loss, scale=scale)
  )
  ref = run_sam_formula(
      params, batches, lr, rho=0.3, adaptive=adaptive, loss=functools.partial(torch_loss, scale=scale)
  )
  assert all(np.all(np.isfinite(v)) for step in ours for v in step.values())
  assert_moves(ref, params)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)


def test_inject_hyperparams_and_schedule():
  params, batches = make_problem(num_steps=5)
  schedule = optax.cosine_decay_schedule(0.2, decay_steps=5)
  injected = optax.inject_hyperparams(sam)(learning_rate=schedule, rho=0.3, adaptive=True, eta=0.01)
  plain = sam(schedule, rho=0.3, adaptive=True, eta=0.01)
  assert_trajectories_close(run_ours(injected, params, batches), run_ours(plain, params, batches))
  with jax.enable_x64(True):
    state = injected.init({k: jnp.asarray(v) for k, v in params.items()})
  assert set(state.hyperparams) == {"learning_rate", "rho", "eta", "eps"}


def test_perturbation_has_radius_rho():
  rng = np.random.default_rng(1)
  grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
  e = sam_perturbation(grads, params, 0.7)
  np.testing.assert_allclose(float(optax.tree.norm(e)), 0.7, rtol=1e-5)
  # ASAM: the radius holds in the rescaled coordinates T^-1 e.
  e = sam_perturbation(grads, params, 0.7, adaptive=True, eta=0.1)
  scaled = jax.tree.map(lambda v, p: v / (jnp.abs(p) + 0.1), e, params)
  np.testing.assert_allclose(float(optax.tree.norm(scaled)), 0.7, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
  params = {"w": jnp.ones(3)}
  tx = sam(0.1)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="params"):
    scale_by_sam().update(params, optax.EmptyState(), None, grad_fn=lambda p: p)
  with pytest.raises(ValueError, match="base_optimizer"):
    sam()
  with pytest.raises(ValueError, match="learning_rate=None"):
    sam(0.1, base_optimizer=optax.adam(1e-3))
