"""Tests for jaxpeft.optim.tram: the defaults against a numpy transcription of our reading of TRAM, the official
options against a torch transcription of the official code (tomsherborne/tram_optimizer).

The numpy reference is the SAM step with the trust-region radius, as we read the paper (not a transcription
of its Algorithm 1 text), with hand-derived gradients of a softmax regression: g = grad L_B(theta_t);
rho_t = d(theta_t); e = rho_t T^2 g / (||T g|| + eps); theta_{t+1} = theta_t - lr * m_t,
m_t = grad L_B(theta_t + e) + momentum * m_{t-1}.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft.optim
from jaxpeft.optim.tram import TramState, scale_by_tram, tram
from tests.optim.reference import assert_trajectories_close

NUM_STEPS = 20
DIM, CLASSES, BATCH = 5, 3, 8
NOISE = 0.5  # input noise scale of TRAM-x
# The trust-region distance is multiplied by this factor (the official code's `logit_scale`) so
# that the radius is large enough for the perturbation to change the trajectory visibly.
DISTANCE_SCALE = 20.0


def make_problem(num_steps: int = NUM_STEPS, batch: int = BATCH, seed: int = 0):
  """Initial params, and per step a batch (x, one-hot y) plus TRAM-x's input noise z."""
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(DIM, CLASSES)), "b": rng.normal(size=(CLASSES,))}
  batches = []
  for _ in range(num_steps):
    x = rng.normal(size=(batch, DIM))
    y = np.eye(CLASSES)[rng.integers(0, CLASSES, size=batch)]
    batches.append((x, y, NOISE * rng.normal(size=(batch, DIM))))
  return params, batches


# ---- numpy transcription of the paper (independent of JAX: gradients derived by hand) ----------


def np_probs(params, x):
  logits = x @ params["w"] + params["b"]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_grad(params, x, y):
  """Gradient of the mean cross-entropy of softmax regression: X^T (p - y) / n, mean(p - y)."""
  delta = (np_probs(params, x) - y) / x.shape[0]
  return {"w": x.T @ delta, "b": delta.sum(0)}


def np_kl(p, q):
  """Batch mean of KL(p || q)."""
  return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)))


def np_tram(params, batches, *, lr, decay, adaptive=False, eta=0.0, momentum=0.0, eps=1e-12):
  """The paper's TRAM step with SGD (+ heavy-ball momentum); ``decay=None`` is TRAM-x.

  ``lr`` is a float or a function of the step index (a schedule).
  """
  theta = {k: v.copy() for k, v in params.items()}
  reference = {k: v.copy() for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  trajectory = []
  for step, (x, y, z) in enumerate(batches):
    g = np_grad(theta, x, y)
    if decay is None:  # TRAM-x: divergence under input noise
      rho = DISTANCE_SCALE * np_kl(np_probs(theta, x + z), np_probs(theta, x))
    else:  # TRAM-theta: divergence from the reference model's predictions
      rho = DISTANCE_SCALE * np_kl(np_probs(reference, x), np_probs(theta, x))
    t = {k: (np.abs(v) + eta if adaptive else np.ones_like(v)) for k, v in theta.items()}
    norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in theta))
    perturbed = {k: theta[k] + rho * t[k] ** 2 * g[k] / (norm + eps) for k in theta}
    g_sam = np_grad(perturbed, x, y)
    if decay is not None:
      reference = {k: decay * reference[k] + (1 - decay) * theta[k] for k in theta}
    for k in theta:
      buf[k] = g_sam[k] + momentum * buf[k]
      theta[k] = theta[k] - (lr(step) if callable(lr) else lr) * buf[k]
    trajectory.append({k: v.copy() for k, v in theta.items()})
  return trajectory


# ---- JAX side -----------------------------------------------------------------------------------


def log_probs(params, x):
  return jax.nn.log_softmax(x @ params["w"] + params["b"])


def loss(params, x, y):
  return -jnp.mean(jnp.sum(y * log_probs(params, x), -1))


def kl(logp, logq):
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))


def trust_region_fn_for(batch, input_noise: bool):
  x, _, z = batch
  if input_noise:  # TRAM-x
    return lambda params, reference: DISTANCE_SCALE * kl(log_probs(params, x + z), log_probs(params, x))
  return lambda params, reference: DISTANCE_SCALE * kl(log_probs(reference, x), log_probs(params, x))


def run_ours(tx, params, batches, *, input_noise=False, dtype=jnp.float64):
  with jax.enable_x64(True):
    p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state, batch):
      grad_fn = lambda q: jax.grad(loss)(q, batch[0], batch[1])
      updates, state = tx.update(
          grad_fn(p), state, p, grad_fn=grad_fn, trust_region_fn=trust_region_fn_for(batch, input_noise)
      )
      return optax.apply_updates(p, updates), state

    trajectory = []
    for batch in batches:
      p, state = step(p, state, tuple(jnp.asarray(a, dtype) for a in batch))
      trajectory.append({k: np.asarray(v) for k, v in p.items()})
  return trajectory


@pytest.mark.parametrize(
    "decay, adaptive, eta, momentum",
    [
        (0.0, False, 0.0, 0.0),  # TRAM-theta_{t-1}
        (1.0, False, 0.0, 0.0),  # TRAM-theta_0
        (0.9, False, 0.0, 0.9),  # moving-average reference, SGD with momentum
        (None, False, 0.0, 0.0),  # TRAM-x
        (0.0, True, 0.01, 0.0),  # ASAM-style neighbourhood
        (None, True, 0.0, 0.9),
    ],
)
def test_matches_numpy_transcription_of_the_paper(decay, adaptive, eta, momentum):
  params, batches = make_problem()
  lr = 0.5
  base = optax.sgd(lr, momentum=momentum or None)
  tx = tram(reference_decay=decay, adaptive=adaptive, eta=eta, base_optimizer=base)
  ours = run_ours(tx, params, batches, input_noise=decay is None)
  settings = dict(lr=lr, decay=decay, adaptive=adaptive, eta=eta, momentum=momentum)
  ref = np_tram(params, batches, **settings)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)
  # The perturbation matters: the same run with no perturbation (plain SGD) ends elsewhere.
  sgd_only = np_tram(params, batches, **settings, eps=np.inf)
  assert max(np.max(np.abs(ref[-1][k] - sgd_only[-1][k])) for k in params) > 1e-3


def test_reference_params_follow_the_decay():
  params, batches = make_problem(num_steps=1)
  with jax.enable_x64(True):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    x, y, _ = (jnp.asarray(a) for a in batches[0])
    grad_fn = lambda q: jax.grad(loss)(q, x, y)
    for decay in (0.0, 0.25, 1.0):
      tx = scale_by_tram(reference_decay=decay)
      start = jax.tree.map(lambda v: v + 1.0, p)
      _, state = tx.update(grad_fn(p), TramState(start), p, grad_fn=grad_fn, trust_region_fn=lambda a, b: 0.1)
      for k in params:
        expected = decay * (params[k] + 1.0) + (1 - decay) * params[k]
        np.testing.assert_allclose(state.reference_params[k], expected)
    assert scale_by_tram(reference_decay=None).init(p) == TramState(None)


def test_pmap_axis_name_equals_single_device_full_batch():
  num_devices = jax.local_device_count()
  assert num_devices >= 2, "conftest should give 8 CPU devices"
  params, batches = make_problem(num_steps=5, batch=2 * num_devices)
  lr = 0.5
  for decay in (0.0, None):
    tx_single = tram(lr, reference_decay=decay, adaptive=True)
    single = run_ours(tx_single, params, batches, input_noise=decay is None)
    tx = tram(lr, reference_decay=decay, adaptive=True, axis_name="batch")
    with jax.enable_x64(True):
      p = {k: jnp.asarray(np.broadcast_to(v, (num_devices, *v.shape))) for k, v in params.items()}
      state = jax.pmap(tx.init)(p)

      def step(p, state, batch):  # gradients and distance on this device's shard only
        grad_fn = lambda q: jax.grad(loss)(q, batch[0], batch[1])
        updates, state = tx.update(
            grad_fn(p), state, p, grad_fn=grad_fn, trust_region_fn=trust_region_fn_for(batch, decay is None)
        )
        return optax.apply_updates(p, updates), state

      pstep = jax.pmap(step, axis_name="batch")
      for i, batch in enumerate(batches):
        p, state = pstep(p, state, tuple(jnp.asarray(a.reshape(num_devices, -1, a.shape[-1])) for a in batch))
        for k in params:
          for d in range(num_devices):
            np.testing.assert_allclose(np.asarray(p[k][d]), single[i][k], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.1)])
def test_low_precision_keeps_dtype_and_tracks_float64(dtype, atol):
  params, batches = make_problem(num_steps=5)
  tx = tram(0.5, reference_decay=0.5, adaptive=True, eta=0.01)
  ref = run_ours(tx, params, batches)
  low = run_ours(tx, params, batches, dtype=dtype)
  for step in low:
    for k in params:
      assert step[k].dtype == dtype
      assert np.all(np.isfinite(step[k].astype(np.float32)))
  for k in params:
    np.testing.assert_allclose(low[-1][k].astype(np.float64), ref[-1][k], atol=atol)
  with jax.enable_x64(True):
    state = tx.init({k: jnp.asarray(v, dtype) for k, v in params.items()})
  assert all(v.dtype == dtype for v in jax.tree.leaves(state))


def test_zero_gradients_and_zero_radius_are_safe():
  params, batches = make_problem(num_steps=3)
  zero = {k: np.zeros_like(v) for k, v in params.items()}
  with jax.enable_x64(True):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    tx = tram(0.5, adaptive=True)
    state = tx.init(p)
    zero_grad_fn = lambda q: jax.tree.map(jnp.zeros_like, q)
    updates, _ = tx.update(zero_grad_fn(p), state, p, grad_fn=zero_grad_fn, trust_region_fn=lambda a, b: 1.0)
    for k in params:
      np.testing.assert_array_equal(updates[k], zero[k])
  # The first step has rho_0 = KL(theta_0 || theta_0) = 0: a plain SGD step.
  first = run_ours(tram(0.5), params, batches[:1])[0]
  x, y, _ = batches[0]
  g = np_grad(params, x, y)
  for k in params:
    np.testing.assert_allclose(first[k], params[k] - 0.5 * g[k], rtol=1e-12)


def test_huge_gradients_match_transcription_without_nan():
  params, batches = make_problem()
  # Inputs of scale 1e30 give gradients of scale 1e30; lr 1e-60 keeps the steps O(1).
  huge = [(1e30 * x, y, 1e30 * z) for x, y, z in batches]
  params = {k: v * 1e-30 for k, v in params.items()}
  ours = run_ours(tram(1e-60, reference_decay=0.0), params, huge)
  ref = np_tram(params, huge, lr=1e-60, decay=0.0)
  assert all(np.all(np.isfinite(v)) for step in ours for v in step.values())
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-42)


def test_inject_hyperparams_and_schedule():
  params, batches = make_problem(num_steps=5)
  schedule = optax.linear_schedule(0.5, 0.1, transition_steps=5)
  injected = optax.inject_hyperparams(tram)(learning_rate=schedule, reference_decay=0.5, adaptive=True)
  plain = tram(schedule, reference_decay=0.5, adaptive=True)
  ours = run_ours(injected, params, batches)
  assert_trajectories_close(ours, run_ours(plain, params, batches))
  with jax.enable_x64(True):
    state = injected.init({k: jnp.asarray(v) for k, v in params.items()})
  assert set(state.hyperparams) == {"learning_rate", "reference_decay", "eta", "eps"}
  # The schedule is applied: the numpy transcription with the schedule's rate at each step.
  ref = np_tram(params, batches, lr=lambda i: float(schedule(i)), decay=0.5, adaptive=True)
  assert_trajectories_close(ours, ref, rtol=1e-6, atol=1e-12)


def test_bad_arguments_raise_clear_errors():
  params = {"w": jnp.ones(3)}
  tx = tram(0.1)
  state = tx.init(params)
  grad_fn = lambda p: p
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, state, params, trust_region_fn=lambda a, b: 0.1)
  with pytest.raises(ValueError, match="trust_region_fn"):
    tx.update(params, state, params, grad_fn=grad_fn)
  with pytest.raises(ValueError, match="scalar"):
    tx.update(params, state, params, grad_fn=grad_fn, trust_region_fn=lambda a, b: jnp.ones(2))
  with pytest.raises(ValueError, match="learning_rate=None"):
    tram(0.1, base_optimizer=optax.adam(1e-3))


# ---- the official code (tomsherborne/tram_optimizer), transcribed in torch -------------------------------------
# tram.py TRAM.first_step / second_step, kl.py KLDivergence("forward"), parameter_target.py ParameterHistoryTarget
# (an eval-mode copy), and the README's training step: the current logits are the training forward's outputs.
# Dropout is a fixed inverted-dropout mask on the inputs (train mode), the same in both forwards of a step.

DROP = 0.25


def _masks(num_steps, seed=3):
  rng = np.random.default_rng(seed)
  return [(rng.random((BATCH, DIM)) > DROP) / (1 - DROP) for _ in range(num_steps)]


def torch_official_tram(params, batches, masks, *, lr, adaptive):
  """SGD base, ParameterHistoryTarget(decay=1): the reference is the initial model, in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  w, b = (torch.tensor(params[k], requires_grad=True) for k in ("w", "b"))
  w0, b0 = w.detach().clone(), b.detach().clone()
  trajectory = []
  for (x, y, _), mask in zip(batches, masks):
    x, y = torch.from_numpy(x), torch.from_numpy(y.argmax(-1))
    train_x = x * torch.from_numpy(mask)
    logits = train_x @ w + b  # model.train(): the loss's forward
    F.cross_entropy(logits, y).backward()
    target = x @ w0 + b0  # the eval-mode reference copy
    divergence = (
        F.kl_div(
            F.log_softmax(logits.detach(), -1, dtype=torch.float32),  # float32, as kl.py
            F.log_softmax(target, -1, dtype=torch.float32),
            log_target=True,
            reduction="mean",
        ).double()
        / x.shape[0]
    )
    with torch.no_grad():  # first_step
      norm = torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm() for p in (w, b)]).norm()
      scale = divergence / (norm + 1e-12)
      old = [p.clone() for p in (w, b)]
      for p in (w, b):
        p.add_(scale * (p * p if adaptive else torch.ones_like(p)))
        p.grad = None
    F.cross_entropy(train_x @ w + b, y).backward()  # second forward-backward, at the shifted point
    with torch.no_grad():  # second_step: back to w, then the base SGD step
      for p, p_old in zip((w, b), old):
        p.copy_(p_old - lr * p.grad)
        p.grad = None
    trajectory.append({"w": w.detach().numpy().copy(), "b": b.detach().numpy().copy()})
  return trajectory


@pytest.mark.parametrize("adaptive", [False, True])
def test_official_options_match_torch_transcription_of_the_official_code(adaptive):
  params, batches = make_problem(num_steps=8)
  masks = _masks(8)
  tx = tram(0.5, reference_decay=1.0, adaptive=adaptive, distance="official_kl", perturbation="official_code")

  def logits(p, x, mask=None):
    return (x if mask is None else x * mask) @ p["w"] + p["b"]

  def ce(p, x, y, mask):
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits(p, x, mask)), -1))

  with jax.enable_x64(True):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state, x, y, mask):
      grad_fn = lambda q: jax.grad(ce)(q, x, y, mask)
      region = lambda q, ref, *, train: (logits(ref, x), logits(q, x, mask if train else None))
      updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn, trust_region_logits_fn=region)
      return optax.apply_updates(p, updates), state

    ours = []
    for (x, y, _), mask in zip(batches, masks):
      p, state = step(p, state, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
      ours.append({k: np.asarray(v) for k, v in p.items()})
  expected = torch_official_tram(params, batches, masks, lr=0.5, adaptive=adaptive)
  assert_trajectories_close(ours, expected, rtol=1e-6, atol=1e-9)  # the KL is float32, as in kl.py
  paper = run_ours(tram(0.5, reference_decay=1.0, adaptive=adaptive), params, batches)
  assert np.abs(paper[-1]["w"] - ours[-1]["w"]).max() > 1e-6  # the options change the trajectory


def test_kl_divergence_normalisations_against_torch():
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  from jaxpeft.optim.tram import kl_divergence

  rng = np.random.default_rng(0)
  target, current = rng.normal(size=(2, BATCH, CLASSES)).astype(np.float32)
  log_t, log_c = (F.log_softmax(torch.from_numpy(a), -1) for a in (target, current))
  batch_mean = F.kl_div(log_c, log_t, log_target=True, reduction="batchmean")
  official = F.kl_div(log_c, log_t, log_target=True, reduction="mean") / BATCH  # kl.py KLDivergence
  np.testing.assert_allclose(kl_divergence(target, current), batch_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(kl_divergence(target, current, official=True), official.numpy(), rtol=1e-6)
  np.testing.assert_allclose(batch_mean / official, BATCH * CLASSES, rtol=1e-5)
  with pytest.raises(ValueError, match="distance='official_kl' computes the distance itself"):
    tx = tram(0.1, distance="official_kl")
    params = {"w": jnp.zeros(2)}
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p, trust_region_fn=lambda a, b: 0.1)


def _lora_problem():
  """An adapter tree with one LoRA pair (a: d_in x r, b: r x d_out) and a bias, and a smooth loss."""
  rng = np.random.default_rng(7)
  params = {
      "dense": {"kernel": {"a": rng.normal(size=(5, 2)), "b": rng.normal(size=(2, 3))}},
      "bias": rng.normal(size=(3,)),
  }
  x = rng.normal(size=(4, 5))

  def loss(p):
    out = jnp.asarray(x) @ p["dense"]["kernel"]["a"] @ p["dense"]["kernel"]["b"] + p["bias"]
    return jnp.sum(jnp.sin(out))

  return params, loss


def _lora_rule_closed_form(rule, g_a, g_b, g_bias, a, b, lr):
  """SGD's step under each LoRA rule, from the rules' papers (numpy, float64)."""
  if rule == "loraplus":  # B (and 1-D leaves) at 16x the learning rate
    return -lr * g_a, -16 * lr * g_b, -16 * lr * g_bias
  if rule == "lora_fa":  # A frozen; B's gradient projected by (A^T A + delta)^-1 (scaling 1)
    return 0 * g_a, -lr * np.linalg.solve(a.T @ a + 1e-8 * np.eye(2), g_b), -lr * g_bias
  # Riemannian preconditioning: g_a (b b^T + reg)^-1, (a^T a + reg)^-1 g_b
  reg = 1e-2 * np.eye(2)
  return -lr * g_a @ np.linalg.inv(b @ b.T + reg), -lr * np.linalg.solve(a.T @ a + reg, g_b), -lr * g_bias


@pytest.mark.parametrize("rule", ["loraplus", "lora_fa", "riemannian_lora"])
def test_composes_with_lora_rules(rule):
  """TRAM with a LoRA rule as its base: one step is the rule's step on the gradient at the TRAM point."""
  lr, rho = 0.1, 0.3
  params, loss = _lora_problem()
  base = getattr(jaxpeft.optim, rule)(lr, base_optimizer=optax.sgd)
  tx = tram(base_optimizer=base)
  with jax.enable_x64(True):
    p = jax.tree.map(jnp.asarray, params)
    g = jax.grad(loss)(p)
    updates, _ = tx.update(g, tx.init(p), p, grad_fn=jax.grad(loss), trust_region_fn=lambda q, ref: rho)
    # Closed form: e = rho g / ||g||, then the rule's SGD step on grad L(theta + e).
    g_np = jax.tree.map(np.asarray, g)
    norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(g_np)))
    perturbed = jax.tree.map(lambda w, v: w + rho * v / (norm + 1e-12), params, g_np)
    g_adv = jax.tree.map(np.asarray, jax.grad(loss)(jax.tree.map(jnp.asarray, perturbed)))
  pair, pair_grad = params["dense"]["kernel"], g_adv["dense"]["kernel"]
  expected = _lora_rule_closed_form(rule, pair_grad["a"], pair_grad["b"], g_adv["bias"], pair["a"], pair["b"], lr)
  ours = (updates["dense"]["kernel"]["a"], updates["dense"]["kernel"]["b"], updates["bias"])
  for got, want in zip(ours, expected):
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
  assert np.abs(expected[1]).max() > 0
