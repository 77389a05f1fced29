"""SoRA: gated low-rank update and the proximal gate step, against numpy closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.methods.sora import gate_mask, proximal_l1, prune_to_lora, sora_labels
from tests.adapters import method_checks as mc

CFG = AdapterConfig(targets="layer/kernel", method="sora", rank=4, alpha=6.0, init="random")


def _np_soft(x, t):
  return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


@pytest.fixture(scope="module")
def setup():
  base = mc.dense_params(6, 5)
  return base, reparam.init(jax.random.key(1), CFG, base)


def test_update_is_closed_form(setup):
  base, adapter = setup
  a, b, g = (np.asarray(adapter["layer"]["kernel"][k], np.float64) for k in ("a", "b", "gate"))
  expect = np.asarray(base["layer"]["kernel"], np.float64) + 6.0 / 4 * a @ np.diag(g) @ b
  np.testing.assert_allclose(reparam.apply(base, adapter, CFG)["layer"]["kernel"], expect, rtol=1e-5, atol=1e-6)
  mc.check_merge_unmerge(base, adapter, CFG)
  assert mc.trainable_count(adapter, CFG) == 4 * (6 + 5) + 4


def test_init_distributions_and_identity():
  d_in, r = 1024, 64
  base = mc.dense_params(d_in, 8)
  cfg = AdapterConfig(targets="layer/kernel", method="sora", rank=r)
  adapter = reparam.init(jax.random.key(2), cfg, base)["layer"]["kernel"]
  bound = 1 / np.sqrt(d_in)  # torch kaiming_uniform_(a=sqrt(5)), as the reference
  assert bound * 0.99 < np.abs(adapter["a"]).max() <= bound
  np.testing.assert_array_equal(adapter["b"], 0.0)
  np.testing.assert_allclose(np.std(adapter["gate"]), 1.0, atol=0.25)  # torch.randn(1, r)
  np.testing.assert_array_equal(
      reparam.apply(base, {"layer": {"kernel": adapter}}, cfg)["layer"]["kernel"], base["layer"]["kernel"]
  )


def test_factored_branch_equals_reparameterized(setup):
  base, adapter = setup
  dense = nn.Dense(5)
  x = jnp.linspace(-1, 1, 18).reshape(3, 6)
  with factored.intercept(
      base["layer"], adapter["layer"], AdapterConfig(targets="kernel", method="sora", rank=4, alpha=6.0)
  ):
    hooked = dense.apply({"params": base["layer"]}, x)
  expect = dense.apply({"params": reparam.apply(base, adapter, CFG)["layer"]}, x)
  np.testing.assert_allclose(hooked, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("multiply_lr,lam", [(False, 0.04), (True, 0.4)])
def test_proximal_step_is_soft_threshold(multiply_lr, lam):
  rng = np.random.default_rng(0)
  params = {"gate": jnp.asarray([0.3, -0.02, 0.05, -1.0, 0.0], jnp.float32)}
  grads = {"gate": jnp.asarray(rng.normal(size=5), jnp.float32)}
  lr = 0.1
  tx = optax.chain(optax.sgd(lr), proximal_l1(lam, learning_rate=lr if multiply_lr else None))
  updates, state = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)["gate"]
  t = lam * lr if multiply_lr else lam
  expect = _np_soft(np.asarray(params["gate"], np.float64) - lr * np.asarray(grads["gate"], np.float64), t)
  np.testing.assert_allclose(new, expect, atol=1e-7)
  assert np.sum(np.asarray(new) == 0) >= 1


def test_reference_zeroing_matches_the_reference_in_place_edits():
  lam = 0.1
  g = np.array([0.05, -0.09, 0.15, -0.19, 0.2, -0.25, 0.31, 1.0], np.float32)
  ref = g.copy()  # TsinghuaC3I/SoRA sparse_optimizer.py, statement by statement
  ref[ref > lam] -= lam
  ref[ref < -lam] += lam
  ref[np.abs(ref) < lam] = 0.0
  tx = proximal_l1(lam, reference_zeroing=True)
  params = {"gate": jnp.asarray(g)}
  zero = {"gate": jnp.zeros_like(params["gate"])}
  new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])["gate"]
  np.testing.assert_allclose(new, ref, atol=1e-7)
  soft = optax.apply_updates(params, proximal_l1(lam).update(zero, tx.init(params), params)[0])["gate"]
  np.testing.assert_allclose(soft, _np_soft(g, lam), atol=1e-7)
  assert not np.allclose(soft, ref)  # 0.15 and -0.19: soft keeps them, the reference zeroes them


def test_prox_composes_with_adam_and_a_lambda_schedule():
  params = {
      "layer": {
          "kernel": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 2)), "gate": jnp.asarray([0.5, -0.5], jnp.float32)}
      }
  }
  grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
  schedule = optax.linear_schedule(0.01, 0.11, transition_steps=2)
  tx = optax.chain(optax.adam(0.1), optax.masked(proximal_l1(schedule), gate_mask))
  state = tx.init(params)
  gate = np.asarray(params["layer"]["kernel"]["gate"], np.float64)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    # Adam's step with a constant gradient is lr * sign(g) (up to eps); factors are not thresholded
    np.testing.assert_allclose(updates["layer"]["kernel"]["a"], -0.1, rtol=1e-5)
    gate = _np_soft(gate - 0.1, 0.01 + 0.05 * step)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["layer"]["kernel"]["gate"], gate, atol=1e-5)
  labels = sora_labels(params)
  assert labels["layer"]["kernel"] == {"a": "factor", "b": "factor", "gate": "gate"}
  with pytest.raises(ValueError, match="needs the current params"):
    proximal_l1(0.1).update(grads, proximal_l1(0.1).init(params))


def test_training_sparsifies_gates_and_prunes_to_lora(tmp_path):
  base = mc.dense_params(8, 6)  # rank 6 <= min(d_in, d_out): any pruned LoRA rank is a valid LoRA rank
  cfg = AdapterConfig(targets="layer/kernel", method="sora", rank=6, alpha=6.0)
  adapter = reparam.init(jax.random.key(12), cfg, base)
  tx = optax.multi_transform(
      {"factor": optax.adam(3e-2), "gate": optax.chain(optax.adam(3e-2), proximal_l1(0.02))}, sora_labels(adapter)
  )
  adapter, losses = mc.train(adapter, base, cfg, tx, *mc.regression_data(8, 6), steps=60)
  assert losses[-1] < 0.7 * losses[0], losses
  gate = np.asarray(adapter["layer"]["kernel"]["gate"])
  assert 0 < np.count_nonzero(gate) < 6, gate  # the prox zeroed some ranks, not all
  lora, lora_cfg = prune_to_lora(adapter, cfg)
  assert lora["layer"]["kernel"]["a"].shape == (8, np.count_nonzero(gate))
  np.testing.assert_allclose(
      reparam.apply(base, lora, lora_cfg)["layer"]["kernel"],
      reparam.apply(base, adapter, cfg)["layer"]["kernel"],
      rtol=1e-5,
      atol=1e-6,
  )
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)
