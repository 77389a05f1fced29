"""ALLoRA: the unscaled LoRA update, and its gradient rule against PyTorch autograd of the same layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import adapter_value_and_grad
from tests.adapters import method_checks as mc

D_IN, D_OUT, RANK, ETA = 6, 5, 3, 4.0


def _config(init="default", **options):
  return AdapterConfig(
      targets="layer/kernel", method="allora", rank=RANK, alpha=64.0, init=init, options={"eta": ETA, **options}
  )


def _torch_reference(base, a, b, x, y, eta):
  """PyTorch autograd of ``mean((x (W + B A)ᵀ + bias - y)^2)``, then ALLoRA's rule applied by hand.

  Returns the expected ``(grad_a, grad_b)`` in jaxpeft's layout and the plain gradient of the loss w.r.t. ``x``.
  """
  w = torch.tensor(np.asarray(base["layer"]["kernel"]).T, dtype=torch.float64)
  bias = torch.tensor(np.asarray(base["layer"]["bias"]), dtype=torch.float64)
  lora_a = torch.tensor(np.asarray(a).T, dtype=torch.float64)  # (r, d_in)
  lora_b = torch.tensor(np.asarray(b).T, dtype=torch.float64)  # (d_out, r)
  delta = (lora_b @ lora_a).requires_grad_(True)
  xt = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
  loss = torch.mean((xt @ (w + delta).T + bias - torch.tensor(np.asarray(y), dtype=torch.float64)) ** 2)
  loss.backward()
  scale = 1.0 / torch.sqrt(torch.linalg.vector_norm(delta.detach(), dim=1) + 1.0 / eta**2)  # rows of B A
  g = scale[:, None] * delta.grad
  return (lora_b.T @ g).T.numpy(), (g @ lora_a.T).T.numpy(), xt.grad.numpy()


def test_update_has_no_scale_and_init_is_identity():
  base = mc.dense_params(D_IN, D_OUT)
  adapter = reparam.init(jax.random.key(1), _config("random"), base)
  a, b = (np.asarray(adapter["layer"]["kernel"][k], np.float64) for k in "ab")
  expect = np.asarray(base["layer"]["kernel"], np.float64) + a @ b  # alpha=64 must not enter
  np.testing.assert_allclose(
      reparam.apply(base, adapter, _config())["layer"]["kernel"], expect, rtol=1e-6, atol=1e-6
  )
  mc.check_merge_unmerge(base, adapter, _config())
  mc.check_factored_equals_merged(base, adapter, _config())
  default = reparam.init(jax.random.key(1), _config(), base)
  np.testing.assert_array_equal(
      reparam.apply(base, default, _config())["layer"]["kernel"], base["layer"]["kernel"]
  )
  assert mc.trainable_count(default, _config()) == RANK * (D_IN + D_OUT)


@pytest.mark.parametrize("eta", [0.5, ETA])
def test_gradients_follow_the_rule_in_both_modes_and_input_gradient_is_plain(eta):
  base = mc.dense_params(D_IN, D_OUT)
  cfg = _config("random", eta=eta)
  adapter = reparam.init(jax.random.key(2), cfg, base)
  x, y = mc.regression_data(D_IN, D_OUT, n=8)
  a, b = adapter["layer"]["kernel"]["a"], adapter["layer"]["kernel"]["b"]
  want_a, want_b, want_x = _torch_reference(base, a, b, x, y, eta)

  _, grads = adapter_value_and_grad(mc.dense_loss, cfg)(adapter, base, x, y)
  np.testing.assert_allclose(grads["layer"]["kernel"]["a"], want_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["layer"]["kernel"]["b"], want_b, rtol=1e-5, atol=1e-6)

  model = mc.OneDense(D_OUT)

  def hooked_loss(adapter, x):
    with factored.intercept(base, adapter, cfg):
      return jnp.mean((model.apply({"params": base}, x) - y) ** 2)

  hooked_grads, grad_x = jax.grad(hooked_loss, argnums=(0, 1))(adapter, x)
  np.testing.assert_allclose(hooked_grads["layer"]["kernel"]["a"], want_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hooked_grads["layer"]["kernel"]["b"], want_b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_x, want_x, rtol=1e-5, atol=1e-6)


def test_at_zero_update_the_gradient_of_b_is_eta_times_lora_and_a_gets_none():
  base = mc.dense_params(D_IN, D_OUT)
  adapter = reparam.init(jax.random.key(3), _config(), base)
  x, y = mc.regression_data(D_IN, D_OUT, n=8)
  lora_a = torch.tensor(np.asarray(adapter["layer"]["kernel"]["a"]).T, dtype=torch.float64, requires_grad=True)
  lora_b = torch.zeros(D_OUT, RANK, dtype=torch.float64, requires_grad=True)
  w = torch.tensor(np.asarray(base["layer"]["kernel"]).T, dtype=torch.float64)
  bias = torch.tensor(np.asarray(base["layer"]["bias"]), dtype=torch.float64)
  xt, yt = (torch.tensor(np.asarray(v), dtype=torch.float64) for v in (x, y))
  torch.mean((xt @ w.T + xt @ lora_a.T @ lora_b.T + bias - yt) ** 2).backward()  # plain LoRA, scale 1
  _, grads = adapter_value_and_grad(mc.dense_loss, _config())(adapter, base, x, y)
  np.testing.assert_allclose(grads["layer"]["kernel"]["b"], ETA * lora_b.grad.numpy().T, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads["layer"]["kernel"]["a"], 0.0)


def test_errors():
  base = mc.dense_params(4, 3)
  with pytest.raises(ValueError, match="removes LoRA's dropout"):
    reparam.init(
        jax.random.key(0),
        AdapterConfig(targets="layer/kernel", method="allora", dropout=0.1, options={"eta": 1.0}),
        base,
    )
  for eta in (None, 0.0, -1.0, "4"):
    with pytest.raises(ValueError, match="eta > 0"):
      reparam.init(
          jax.random.key(0), AdapterConfig(targets="layer/kernel", method="allora", options={"eta": eta}), base
      )


def test_training_reduces_loss_and_checkpoint(tmp_path):
  base = mc.dense_params(8, 4)
  cfg = AdapterConfig(targets="layer/kernel", method="allora", rank=2, options={"eta": ETA})
  mc.check_training_reduces_loss(cfg, base)
  adapter = reparam.init(jax.random.key(12), cfg, base)
  mc.check_checkpoint_round_trip(tmp_path, base, adapter, cfg)
