"""Checks shared by the convolution-kernel adapter tests (LoRA-C / convLoRA, CP-LoRA, DoRA-C / convDoRA / CP-DoRA).

The base is one Flax ``nn.Conv`` called ``layer`` (kernel ``(k, k, I, O)``, padding 1); outputs are compared
with PyTorch's ``conv2d`` on the same weights (NCHW, ``W_t = K.transpose(3, 2, 0, 1)``), an independent conv.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.partition import adapter_value_and_grad, param_count

K, C_IN, C_OUT = 3, 3, 4
FAN_IN = {"layer/kernel": 3}


def conv_base(seed=0, k=K, c_in=C_IN, c_out=C_OUT):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "layer": {
          "kernel": jax.random.normal(k1, (k, k, c_in, c_out), jnp.float32) / np.sqrt(k * k * c_in),
          "bias": 0.1 * jax.random.normal(k2, (c_out,), jnp.float32),
      }
  }


def images(seed=0, c_in=C_IN, size=6):
  return np.random.default_rng(seed).normal(size=(2, size, size, c_in)).astype(np.float32)  # NHWC


def flax_conv(params, x):
  kh, kw, _, c_out = params["layer"]["kernel"].shape
  return nn.Conv(c_out, (kh, kw), padding=1).apply({"params": params["layer"]}, x)


def torch_conv(kernel_t, bias, x):
  """PyTorch conv2d (padding 1) of NHWC ``x`` with a PyTorch-layout ``(O, I, kh, kw)`` kernel; returns NHWC."""
  out = torch.nn.functional.conv2d(
      torch.from_numpy(x.transpose(0, 3, 1, 2)),
      torch.from_numpy(np.array(kernel_t, np.float32)),
      torch.from_numpy(np.array(bias, np.float32)),
      padding=1,
  )
  return out.numpy().transpose(0, 2, 3, 1)


def to_torch_layout(kernel):
  """Flax ``(kh, kw, I, O)`` -> PyTorch ``(O, I, kh, kw)``."""
  return np.asarray(kernel, np.float64).transpose(3, 2, 0, 1)


def check_conv_training(config, base, steps=40, lr=3e-2):
  """Adam on the adapter lowers the MSE to a conv with a perturbed kernel; optimizer state is adapter-only."""
  x = jnp.asarray(images(seed=3, size=8))
  teacher = jax.tree_util.tree_map(lambda w: w, base)
  teacher["layer"]["kernel"] = base["layer"]["kernel"] + 0.3 * jax.random.normal(
      jax.random.key(7), base["layer"]["kernel"].shape
  )
  y = flax_conv(teacher, x)

  def loss_fn(params, x, y):
    return jnp.mean((flax_conv(params, x) - y) ** 2)

  adapter = reparam.init(jax.random.key(12), config, base)
  tx = optax.adam(lr)
  grad_fn = jax.jit(adapter_value_and_grad(loss_fn, config))
  state = tx.init(adapter)
  first = None
  for _ in range(steps):
    loss, grads = grad_fn(adapter, base, x, y)
    first = loss if first is None else first
    updates, state = tx.update(grads, state, adapter)
    adapter = optax.apply_updates(adapter, updates)
  last = loss_fn(reparam.apply(base, adapter, config), x, y)
  assert last < 0.8 * first, (float(first), float(last))
  assert param_count(state) == 2 * param_count(adapter) + 1  # adam: 2 moments per adapter scalar + count
