"""Training only the adapter: gradients and optimizer state cover adapter leaves only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, register_method
from jaxpeft.adapters.partition import adapter_value_and_grad, optimizer_labels, param_count


def test_adapter_only_gradients_match_closed_form_and_training_reduces_loss():
  model = nn.Dense(4)
  x = jnp.linspace(-1.0, 1.0, 30).reshape(6, 5)
  y = jnp.cos(jnp.arange(24.0)).reshape(6, 4)
  base = model.init(jax.random.key(0), x)["params"]
  cfg = AdapterConfig(targets="kernel", rank=2, alpha=4.0, init="random")
  adapter = reparam.init(jax.random.key(1), cfg, base)

  def loss_fn(params, x, y):
    return jnp.sum((model.apply({"params": params}, x) - y) ** 2)

  grad_fn = jax.jit(adapter_value_and_grad(loss_fn, cfg))
  loss, grads = grad_fn(adapter, base, x, y)
  # closed form: dL/dW' = x^T 2 (x W' + bias - y); dL/db = s a^T dL/dW'; dL/da = s dL/dW' b^T
  a, b = (np.asarray(adapter["kernel"][k], np.float64) for k in "ab")
  w = np.asarray(base["kernel"], np.float64) + 2.0 * a @ b
  res = np.asarray(x) @ w + np.asarray(base["bias"]) - np.asarray(y)
  dw = np.asarray(x).T @ (2 * res)
  np.testing.assert_allclose(loss, np.sum(res**2), rtol=1e-5)
  np.testing.assert_allclose(grads["kernel"]["b"], 2.0 * a.T @ dw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads["kernel"]["a"], 2.0 * dw @ b.T, rtol=1e-4, atol=1e-5)

  tx = optax.adam(0.05)
  opt_state = tx.init(adapter)
  assert param_count(opt_state) == 2 * param_count(adapter) + 1  # mu, nu for adapter leaves + step count
  assert param_count(adapter) == 2 * (5 + 4)

  @jax.jit
  def step(adapter, opt_state):
    loss, grads = grad_fn(adapter, base, x, y)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  for _ in range(30):
    adapter, opt_state, last = step(adapter, opt_state)
  assert last < 0.5 * loss


@register_method("test_frozen_projection")
class _FrozenProjection(AdapterMethod):
  """W' = W + p * c with a stored, untrained projection p (a VeRA-like shape of the problem)."""

  frozen_leaves = frozenset({"p"})

  def init(self, rng, kernel, target):
    return {"p": jax.random.normal(rng, kernel.shape), "c": jnp.ones((), jnp.float32)}

  def delta(self, leaves, target):
    return leaves["p"] * leaves["c"]


def test_frozen_leaves_get_no_gradient_and_no_optimizer_state():
  base = {"kernel": jnp.ones((3, 2))}
  cfg = AdapterConfig(targets="kernel", method="test_frozen_projection")
  adapter = reparam.init(jax.random.key(0), cfg, base)
  _, grads = adapter_value_and_grad(lambda p: jnp.sum(p["kernel"] ** 2), cfg)(adapter, base)
  np.testing.assert_array_equal(grads["kernel"]["p"], 0.0)
  p = np.asarray(adapter["kernel"]["p"])
  np.testing.assert_allclose(grads["kernel"]["c"], np.sum(2 * (1 + p) * p), rtol=1e-5)
  labels = optimizer_labels(adapter, cfg)
  assert labels == {"kernel": {"p": "frozen", "c": "trainable"}}
  tx = optax.multi_transform({"trainable": optax.adam(0.1), "frozen": optax.set_to_zero()}, labels)
  state = tx.init(adapter)
  assert param_count(state) == 2 * 1 + 1  # adam moments for the scalar c only, plus its step count
