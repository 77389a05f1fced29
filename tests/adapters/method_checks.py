"""Checks and training scaffolding shared by the adapter-method tests.

Every check compares against an independent computation (PEFT in PyTorch, or the base weights themselves),
never against another output of the same jaxpeft code path.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import traverse_util

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.adapters.core import get_method
from jaxpeft.adapters.partition import adapter_value_and_grad, optimizer_labels, param_count

TOL = dict(atol=1e-5, rtol=1e-5)


class Wrap(torch.nn.Module):
  """A one-layer torch model whose adapted module is called ``layer`` (PEFT ``target_modules=["layer"]``)."""

  def __init__(self, layer):
    super().__init__()
    self.layer = layer

  def forward(self, x):
    return self.layer(x)


def t2n(x) -> np.ndarray:
  return np.asarray(x.detach().float().numpy(), np.float32)


def dense_params(d_in, d_out, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "layer": {
          "kernel": jax.random.normal(k1, (d_in, d_out), jnp.float32) / np.sqrt(d_in),
          "bias": 0.1 * jax.random.normal(k2, (d_out,), jnp.float32),
      }
  }


def trainable_count(adapter, config) -> int:
  """Scalars in the adapter leaves the optimizer trains (the method's ``frozen_leaves`` excluded)."""
  frozen = get_method(config.method).frozen_leaves
  flat = traverse_util.flatten_dict(adapter)
  return sum(int(v.size) for k, v in flat.items() if k[-1] not in frozen)


def check_merge_unmerge(base, adapter, config, *, unmergeable=True):
  """merge == apply; unmerge(merge) == base; the adapter changes the weights."""
  applied = reparam.apply(base, adapter, config)
  merged = reparam.merge(base, adapter, config)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), applied, merged)
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b, atol=1e-4), merged, base)
  assert any(jax.tree_util.tree_leaves(changed)), "the adapter did not change any weight"
  if unmergeable:
    restored = reparam.unmerge(merged, adapter, config)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), restored, base)


def dense_loss(params, x, y):
  """Mean squared error of the one-layer model ``x W + b`` held in ``params["layer"]``."""
  return jnp.mean((x @ params["layer"]["kernel"] + params["layer"]["bias"] - y) ** 2)


def regression_data(d_in, d_out, n=32):
  """``(x, y)`` with ``y = sin(x M)`` for a random ``M``: a target no small adapter fits exactly."""
  x = jax.random.normal(jax.random.key(10), (n, d_in))
  return x, jnp.sin(x @ jax.random.normal(jax.random.key(11), (d_in, d_out)))


def adapter_adam(lr, adapter, config):
  """Adam on the trainable adapter leaves, ``set_to_zero`` (no state) on the method's frozen leaves."""
  return optax.multi_transform(
      {"trainable": optax.adam(lr), "frozen": optax.set_to_zero()}, optimizer_labels(adapter, config)
  )


def train(adapter, base, config, tx, *args, loss_fn=dense_loss, steps=40):
  """``steps`` jitted steps of ``tx`` on the adapter only (``base`` frozen); returns ``(adapter, losses)``.

  ``loss_fn(params, *args)`` is the full-model loss on ``reparam.apply(base, adapter, config)``; ``losses[i]``
  is the loss before step ``i``.
  """
  grad_fn = adapter_value_and_grad(loss_fn, config)

  @jax.jit
  def step(adapter, opt_state):
    loss, grads = grad_fn(adapter, base, *args)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  opt_state = tx.init(adapter)
  losses = []
  for _ in range(steps):
    adapter, opt_state, loss = step(adapter, opt_state)
    losses.append(float(loss))
  return adapter, losses


def check_svd_init(base, adapter, config):
  """SVD-based inits: ``apply`` at init is exactly the base, and ``u diag(s) vt`` is the SVD of the kernel."""
  kernel, lv = base["layer"]["kernel"], adapter["layer"]["kernel"]
  np.testing.assert_array_equal(reparam.apply(base, adapter, config)["layer"]["kernel"], kernel)
  np.testing.assert_allclose((lv["u"] * lv["s"]) @ lv["vt"], kernel, atol=1e-5)
  np.testing.assert_allclose(lv["s"], np.linalg.svd(np.asarray(kernel), compute_uv=False), rtol=1e-5)


class OneDense(nn.Module):
  """The one-layer model of ``dense_params``: a ``Dense`` named ``layer``."""

  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, use_bias=self.use_bias, name="layer")(x)


def check_factored_equals_merged(base, adapter, config, *, seed=1):
  """The activation-hook mode on ``OneDense`` gives the outputs of the merged weights."""
  d_in, d_out = base["layer"]["kernel"].shape
  model = OneDense(d_out, use_bias="bias" in base["layer"])
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(3, d_in)), jnp.float32)
  with factored.intercept(base, adapter, config):
    hooked = model.apply({"params": base}, x)
  merged = model.apply({"params": reparam.merge(base, adapter, config)}, x)
  assert not np.allclose(merged, model.apply({"params": base}, x), atol=1e-4), "the adapter changes nothing"
  np.testing.assert_allclose(hooked, merged, rtol=1e-5, atol=1e-5)


def check_training_reduces_loss(config, base, steps=40, lr=3e-2, max_ratio=0.8):
  """Adam on the adapter only (frozen leaves get ``set_to_zero``) lowers a regression loss on ``layer``."""
  x, y = regression_data(*base["layer"]["kernel"].shape)
  y = y + 0.5
  adapter = reparam.init(jax.random.key(12), config, base)
  tx = adapter_adam(lr, adapter, config)
  adapter, losses = train(adapter, base, config, tx, x, y, steps=steps)
  last = float(dense_loss(reparam.apply(base, adapter, config), x, y))
  assert last < max_ratio * losses[0], (losses[0], last)
  # no optimizer state for frozen leaves: adam keeps 2 moments per trainable scalar (+ its step count)
  assert param_count(tx.init(adapter)) == 2 * trainable_count(adapter, config) + 1


def check_checkpoint_round_trip(tmp_path, base, adapter, config, filename="adapter.safetensors"):
  """``save_adapter`` then ``load_adapter`` (validated against ``base``) gives back the adapter and config."""
  path = tmp_path / filename
  save_adapter(path, adapter, config)
  loaded, loaded_config = load_adapter(path, base)
  assert loaded_config == config
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, adapter)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(a, b),
      reparam.apply(base, loaded, loaded_config),
      reparam.apply(base, adapter, config),
  )


def linear_params(layer) -> dict:
  """Flax Dense params from a (PEFT-wrapped) torch Linear's base layer."""
  base = layer.get_base_layer()
  params = {"kernel": jnp.asarray(t2n(base.weight).T)}
  if base.bias is not None:
    params["bias"] = jnp.asarray(t2n(base.bias))
  return params


def conv_params(layer) -> dict:
  base = layer.get_base_layer()
  params = {"kernel": jnp.asarray(t2n(base.weight).transpose(2, 3, 1, 0))}
  if base.bias is not None:
    params["bias"] = jnp.asarray(t2n(base.bias))
  return params


def check_linear_parity(model, params, adapter, config, d_in, *, seed=0):
  """PEFT model (wrapping a Linear as ``layer``) vs ``nn.Dense`` on ``reparam.apply``, before/after merge."""
  x = np.random.default_rng(seed).normal(size=(4, d_in)).astype(np.float32)
  d_out = params["kernel"].shape[1]
  dense = nn.Dense(d_out, use_bias="bias" in params)
  expect = t2n(model(torch.from_numpy(x)))
  np.testing.assert_allclose(dense.apply({"params": reparam.apply(params, adapter, config)}, x), expect, **TOL)
  assert not np.allclose(expect, dense.apply({"params": params}, x), atol=1e-3)  # the adapter matters
  merged_torch = model.merge_and_unload().layer
  merged = reparam.merge(params, adapter, config)
  np.testing.assert_allclose(merged["kernel"], t2n(merged_torch.weight).T, **TOL)
  if "bias" in params:
    np.testing.assert_allclose(merged["bias"], t2n(merged_torch.bias), **TOL)
  np.testing.assert_allclose(dense.apply({"params": merged}, x), t2n(merged_torch(torch.from_numpy(x))), **TOL)
  return float(np.abs(dense.apply({"params": reparam.apply(params, adapter, config)}, x) - expect).max())


def check_conv_parity(model, params, adapter, config, c_in, *, seed=1):
  """PEFT model (wrapping a 3x3 Conv2d, padding 1) vs ``nn.Conv`` on ``reparam.apply``, before/after merge."""
  x = np.random.default_rng(seed).normal(size=(2, c_in, 5, 5)).astype(np.float32)  # NCHW
  kh, kw, _, c_out = params["kernel"].shape
  conv = nn.Conv(c_out, (kh, kw), padding=1, use_bias="bias" in params)
  expect = t2n(model(torch.from_numpy(x))).transpose(0, 2, 3, 1)
  ours = conv.apply({"params": reparam.apply(params, adapter, config)}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(ours, expect, **TOL)
  assert not np.allclose(expect, conv.apply({"params": params}, x.transpose(0, 2, 3, 1)), atol=1e-3)
  merged_torch = model.merge_and_unload().layer
  merged = reparam.merge(params, adapter, config)
  np.testing.assert_allclose(merged["kernel"], t2n(merged_torch.weight).transpose(2, 3, 1, 0), **TOL)
  if "bias" in params:
    np.testing.assert_allclose(merged["bias"], t2n(merged_torch.bias), **TOL)
  return float(np.abs(ours - expect).max())
