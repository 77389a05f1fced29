"""`activations.gelu` is PyTorch's exact GELU: values and gradients against `torch.nn.functional.gelu`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.models import activations

torch = pytest.importorskip("torch")


def _inputs() -> np.ndarray:
  rng = np.random.default_rng(0)
  return np.concatenate([rng.standard_normal(4096), np.linspace(-12.0, 12.0, 2001)]).astype(np.float32)


def test_values_and_gradients_equal_torch():
  x = _inputs()
  t = torch.from_numpy(x).requires_grad_()
  expected = torch.nn.functional.gelu(t)
  expected.sum().backward()
  value, grad = jax.value_and_grad(lambda v: activations.gelu(v).sum())(jnp.asarray(x))
  np.testing.assert_allclose(activations.gelu(jnp.asarray(x)), expected.detach().numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, expected.sum().item(), rtol=1e-5)


def test_equals_jax_erfc_form_to_rounding():
  x = jnp.asarray(_inputs())
  np.testing.assert_allclose(activations.gelu(x), jax.nn.gelu(x, approximate=False), rtol=0, atol=2e-6)


def test_keeps_dtype():
  assert activations.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
