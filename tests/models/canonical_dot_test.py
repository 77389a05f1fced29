"""`canonical_dot.dot_general` computes what `lax.dot_general` computes: values, gradients, JVPs, HVPs."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxpeft.models import canonical_dot

# (input shape, layer): Dense, DenseGeneral folding two input axes (ViT's attention out) and one
# producing two output axes (ViT's q/k/v), a 2-D input.
LAYERS = [
    ((3, 5, 6), lambda dg: nn.Dense(7, dot_general=dg)),
    ((2, 4, 3, 5), lambda dg: nn.DenseGeneral(6, axis=(-2, -1), dot_general=dg)),
    ((4, 9), lambda dg: nn.DenseGeneral((2, 3), dot_general=dg)),
]


@pytest.fixture(autouse=True)
def _force_on(monkeypatch):
  monkeypatch.setenv(canonical_dot.ENV_VAR, "1")


def _models(make):
  return make(lax.dot_general), make(canonical_dot.dot_general)


def _hlo_dots(fn, *args) -> str:
  return "\n".join(l for l in jax.jit(fn).lower(*args).compile().as_text().splitlines() if " dot(" in l)


@pytest.mark.parametrize("shape,make", LAYERS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_values_gradients_jvp_and_hvp_equal_plain(shape, make, dtype, tol):
  plain, canonical = _models(make)
  x = jax.random.normal(jax.random.key(0), shape, dtype)
  params = jax.tree.map(lambda p: p.astype(dtype), plain.init(jax.random.key(1), x)["params"])
  tangent = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape, dtype), params)

  def loss(model, p, x):
    return jnp.sum(jnp.tanh(model.apply({"params": p}, x)).astype(jnp.float32) ** 2)

  for fn in (
      lambda m: m.apply({"params": params}, x),
      lambda m: jax.grad(functools.partial(loss, m), argnums=(0, 1))(params, x),
      lambda m: jax.jvp(lambda p: m.apply({"params": p}, x), (params,), (tangent,)),
      # Hessian-vector product (AdaHessian's): forward-over-reverse.
      lambda m: jax.jvp(jax.grad(lambda p: loss(m, p, x)), (params,), (tangent,))[1],
  ):
    chex.assert_trees_all_close(fn(canonical), fn(plain), rtol=tol, atol=tol)


def test_full_hessian_equals_plain():
  plain, canonical = _models(LAYERS[0][1])
  x = jax.random.normal(jax.random.key(0), (2, 3, 6))
  params = plain.init(jax.random.key(1), x)["params"]
  hessian = lambda m: jax.hessian(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x))))(params)
  chex.assert_trees_all_close(hessian(canonical), hessian(plain), rtol=1e-5, atol=1e-5)


def test_weight_gradient_dot_is_canonical():
  """The plain weight gradient contracts the left operand's leading axis; the canonical one its trailing axis."""
  x, w = jnp.ones((64, 16)), jnp.ones((16, 32))
  grad = lambda dg: jax.grad(lambda w: jnp.sum(jnp.sin(dg(x, w, (((1,), (0,)), ((), ()))))))
  assert "lhs_contracting_dims={0}" in _hlo_dots(grad(lax.dot_general), w)
  assert "lhs_contracting_dims={0}" not in _hlo_dots(grad(canonical_dot.dot_general), w)


def test_switch(monkeypatch):
  x, w = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)
  dims = (((1,), (0,)), ((), ()))
  # A new function each time: the switch is read at trace time, and traces are cached per function.
  jaxpr = lambda: str(jax.make_jaxpr(lambda a, b: canonical_dot.dot_general(a, b, dims))(x, w))
  monkeypatch.setenv(canonical_dot.ENV_VAR, "0")
  assert not canonical_dot.enabled()
  assert "custom_jvp" not in jaxpr()
  monkeypatch.setenv(canonical_dot.ENV_VAR, "1")
  assert "custom_jvp" in jaxpr()
  monkeypatch.delenv(canonical_dot.ENV_VAR)
  assert not canonical_dot.enabled()
  assert "custom_jvp" not in jaxpr()
  monkeypatch.setenv(canonical_dot.ENV_VAR, "yes")
  with pytest.raises(ValueError, match="JAXPEFT_CANONICAL_DOT='yes'"):
    canonical_dot.enabled()
