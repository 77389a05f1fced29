"""`canonical_dot.dot_general` computes what `lax.dot_general` computes (values, gradients, JVPs, HVPs), without
transposed copies in the weight gradient."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxpeft import canonical_dot

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


def _hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


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


def test_weight_gradient_dot_needs_no_transposed_copy():
  """Plain: dy is copied transposed for a dot contracting two leading axes; folded: one 2-D dot, no copies."""
  x, w = jnp.ones((4, 16, 8)), jnp.ones((8, 32))
  dims = (((2,), (0,)), ((), ()))
  grad = lambda dg: jax.grad(lambda w: jnp.sum(jnp.sin(dg(x, w, dims))))
  plain = _hlo(grad(lax.dot_general), w)
  folded = _hlo(grad(canonical_dot.dot_general), w)
  assert "f32[32,64]" in plain  # dy (64 tokens x 32 outputs) laid out transposed for the weight gradient
  assert "f32[32,64]" not in folded
  assert [l for l in folded.splitlines() if " dot(" in l and "lhs_contracting_dims={0}" in l]


def test_narrowing_weight_gradient_is_a_product_with_few_rows():
  """For M < K the weight gradient is computed as dy^T x, (M, K), then transposed; plainly it is x^T dy, (K, M)."""
  x, w = jnp.ones((4, 16, 24)), jnp.ones((24, 4))
  dims = (((2,), (0,)), ((), ()))
  grad = lambda dg: jax.grad(lambda w: jnp.sum(jnp.sin(dg(x, w, dims))))
  outputs = lambda hlo: {l.split(" = ")[1].split(" ")[0].split("{")[0] for l in hlo.splitlines() if " dot(" in l}
  assert "f32[4,24]" not in outputs(_hlo(grad(lax.dot_general), w))
  assert "f32[4,24]" in outputs(_hlo(grad(canonical_dot.dot_general), w))


def test_matmul_is_x_at_w():
  x, w = jax.random.normal(jax.random.key(0), (2, 3, 8)), jax.random.normal(jax.random.key(1), (8, 3))
  chex.assert_trees_all_close(canonical_dot.matmul(x, w), x @ w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "lhs_shape,rhs_shape,dims",
    [
        ((2, 3, 4), (4, 5), (((2,), (0,)), ((), ()))),  # folded
        ((3, 4), (4, 5), (((1,), (0,)), ((), ()))),  # already 2-D
        ((2, 3, 8), (8, 3), (((2,), (0,)), ((), ()))),  # narrowing (M < K): folded, transposed weight
        ((6, 2, 4), (2, 4, 3), (((1, 2), (0, 1)), ((), ()))),  # narrowing, two contracted axes
        ((2, 4, 3), (4, 5), (((1,), (0,)), ((), ()))),  # contracted axis not trailing: plain
        ((2, 3, 4), (5, 4), (((2,), (1,)), ((), ()))),  # contracted axis not leading on the right: plain
        ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))),  # batch dimensions: plain
    ],
)
def test_equals_plain_for_every_layout(lhs_shape, rhs_shape, dims):
  lhs = jax.random.normal(jax.random.key(0), lhs_shape)
  rhs = jax.random.normal(jax.random.key(1), rhs_shape)
  chex.assert_trees_all_close(
      canonical_dot.dot_general(lhs, rhs, dims), lax.dot_general(lhs, rhs, dims), rtol=1e-6, atol=1e-6
  )


def test_switch(monkeypatch):
  x, w = np.ones((2, 4, 3), np.float32), np.ones((3, 2), np.float32)
  dims = (((2,), (0,)), ((), ()))
  # A new function each time: the switch is read at trace time, and traces are cached per function.
  jaxpr = lambda: str(jax.make_jaxpr(lambda a, b: canonical_dot.dot_general(a, b, dims))(x, w))
  monkeypatch.setenv(canonical_dot.ENV_VAR, "0")
  assert not canonical_dot.enabled()
  assert "reshape" not in jaxpr()
  monkeypatch.setenv(canonical_dot.ENV_VAR, "1")
  assert "reshape" in jaxpr()
  monkeypatch.delenv(canonical_dot.ENV_VAR)
  assert canonical_dot.enabled()
  assert "reshape" in jaxpr()
  monkeypatch.setenv(canonical_dot.ENV_VAR, "yes")
  with pytest.raises(ValueError, match="JAXPEFT_CANONICAL_DOT='yes'"):
    canonical_dot.enabled()
