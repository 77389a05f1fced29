"""Riemannian preconditioned LoRA against PEFT's create_riemannian_optimizer (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft.optimizers import create_riemannian_optimizer

from jaxpeft.optim.riemannian_lora import riemannian_lora
from tests.optim import peft_lora_reference as ref

LR = 2.0**-7
NUM_STEPS = 10

BASES = {
    "scaled_gd": ((torch.optim.SGD, {}), optax.sgd),
    "scaled_adamw": ((torch.optim.AdamW, {"weight_decay": 0.1}), functools.partial(optax.adamw, weight_decay=0.1)),
}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("reg", [1e-2, 0.5])
def test_matches_peft(base, reg):
  (torch_cls, torch_kw), optax_base = BASES[base]
  model, by_path = ref.peft_model(bias="all")
  params = ref.initial_params(by_path)
  grads = ref.random_grads(params, NUM_STEPS)
  peft_opt = create_riemannian_optimizer(model, torch_cls, lr=LR, reg=reg, **torch_kw)
  ours = ref.run_ours(riemannian_lora(LR, reg, base_optimizer=optax_base), params, grads)
  ref.assert_same_trajectories(ours, ref.run_peft(peft_opt, by_path, grads))


def test_preconditioning_is_active_on_kernels_only():
  model, by_path = ref.peft_model(bias="all")
  params = ref.initial_params(by_path)
  grads = ref.random_grads(params, 1)
  plain = ref.run_ours(optax.sgd(LR), params, grads)[-1]
  ours = ref.run_ours(riemannian_lora(LR, base_optimizer=optax.sgd), params, grads)[-1]
  for k in params:
    same = np.allclose(plain[k], ours[k], rtol=1e-12)
    assert same == (k.startswith("emb/") or k.endswith("bias")), k


def test_stacked_layers_are_batched():
  """Factors with a leading layer axis (scanned layers) are preconditioned layer by layer."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 4))
  ga, gb = rng.normal(size=a.shape), rng.normal(size=b.shape)
  with jax.enable_x64(True):
    tx = riemannian_lora(1.0, 0.1, base_optimizer=optax.sgd)
    tree = {"kernel": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}
    updates, _ = tx.update({"kernel": {"a": jnp.asarray(ga), "b": jnp.asarray(gb)}}, tx.init(tree), tree)
  for i in range(3):
    np.testing.assert_allclose(-updates["kernel"]["a"][i], ga[i] @ np.linalg.inv(b[i] @ b[i].T + 0.1 * np.eye(2)))
    np.testing.assert_allclose(-updates["kernel"]["b"][i], np.linalg.inv(a[i].T @ a[i] + 0.1 * np.eye(2)) @ gb[i])
