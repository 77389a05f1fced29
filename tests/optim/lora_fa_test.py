"""LoRA-FA against PEFT's create_lorafa_optimizer (its bfloat16 autocast patched off, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from peft.optimizers import create_lorafa_optimizer
from peft.optimizers import lorafa as peft_lorafa

from jaxpeft.optim.lora_fa import lora_fa
from tests.optim import peft_lora_reference as ref

LR = 2.0**-7
NUM_STEPS = 10


def hf_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6):
  """The base optimizer inside PEFT's LoRA-FA: Hugging Face's old AdamW (no decay by default), which
  adds eps to sqrt(v_t) before the bias correction, unlike optax.adam (eps / sqrt(1 - b2**t) there)."""

  def init_fn(params):
    return (jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), optax.tree.zeros_like(params))

  def update_fn(grads, state, params=None):
    count, mu, nu = state
    count = count + 1
    mu = optax.tree.update_moment(grads, mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(grads, nu, b2, 2)
    step = learning_rate * jnp.sqrt(1 - b2**count) / (1 - b1**count)
    return jax.tree.map(lambda m, v: -step * m / (jnp.sqrt(v) + eps), mu, nu), (count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_matches_peft(bias, monkeypatch):
  monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
  model, by_path = ref.peft_model(bias=bias)
  params = ref.initial_params(by_path)
  grads = ref.random_grads(params, NUM_STEPS)
  peft_opt = create_lorafa_optimizer(model, r=ref.RANK, lora_alpha=ref.ALPHA, lr=LR)
  ours = ref.run_ours(lora_fa(LR, scaling=ref.ALPHA / ref.RANK, base_optimizer=hf_adam), params, grads)
  trajectory = ref.run_peft(peft_opt, by_path, grads)
  ref.assert_same_trajectories(ours, trajectory)
  for k in params:  # A frozen, everything else moved
    assert np.array_equal(trajectory[-1][k], params[k]) == k.endswith("/a"), k


def test_projection_is_least_squares_fit_of_full_gradient():
  """With one SGD step of lr 1 the weight change s A (B' - B) = -s A g~_B is minus the projection
  P_A G of the full weight's gradient G = dL/dW onto span(A) (closed form: for W' = W + s A B,
  g_B = s A^T G and P_A = A (A^T A)^-1 A^T)."""
  rng = np.random.default_rng(0)
  a, b, full = rng.normal(size=(6, 2)), rng.normal(size=(2, 4)), rng.normal(size=(6, 4))
  s = 2.0
  tree = {"layer": {"kernel": {"a": a, "b": b}}}
  grads = {"layer": {"kernel": {"a": s * full @ b.T, "b": s * a.T @ full}}}
  with jax.enable_x64(True):
    tx = lora_fa(1.0, scaling=s, delta=0.0, base_optimizer=optax.sgd)
    updates, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(tree), jax.tree.map(jnp.asarray, tree))
  delta_w = s * a @ np.asarray(updates["layer"]["kernel"]["b"])
  np.testing.assert_allclose(delta_w, -a @ np.linalg.solve(a.T @ a, a.T @ full), rtol=1e-10)
  assert not np.any(updates["layer"]["kernel"]["a"])


def test_frozen_factors_have_no_optimizer_state():
  tree = {"layer": {"kernel": {"a": jnp.ones((6, 2)), "b": jnp.ones((2, 4))}, "bias": jnp.ones(4)}}
  state = lora_fa(LR, base_optimizer=optax.adam).init(tree)
  sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert sizes == 2 * (2 * 4 + 4)  # Adam's two moments of b and bias only


def test_needs_params():
  tree = {"layer": {"kernel": {"a": jnp.ones((6, 2)), "b": jnp.ones((2, 4))}}}
  tx = lora_fa(LR)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(tree, tx.init(tree))
