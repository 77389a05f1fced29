"""A `lax.dot_general` for Dense layers whose weight-gradient product reaches XLA:CPU as one 2-D matrix product.

A Dense layer applied to activations of shape (batch, tokens, d_in) computes `y = x W` as a dot_general that
contracts x's last axis, with (batch, tokens) as free axes. Reverse mode then writes the weight gradient

  dW = sum over batch and tokens of x^T dy = dot_general(x, dy, contract (batch, tokens) of both),

a product contracting two *leading* axes. XLA:CPU lowers it by first copying dy into a transposed
(d_out, batch*tokens) buffer and then calling Eigen on the transposed pair (YNNPACK, its fast dot path, takes
only a left operand contracting its trailing axes). In the train step of BERT at all-MiniLM-L6-v2's size
(batch 64 x 128) these weight-gradient dots ran at 59-78 GFLOP/s against 85-94 for the forward and
input-gradient products, and the transposed copies of dy took another ~0.2 s of a ~9 s step (profile in
the README, "Train-step speed"; issue 20).

`dot_general` here folds the free axes of the activations into one token axis and the contracted axes into
one feature axis before the product, and unfolds the result:

  y = reshape(reshape(x, (N, K)) . reshape(W, (K, M)), x's free shape + W's free shape)

so the weight gradient is the 2-D product `x2^T dy2` of two row-major (N, K) and (N, M) operands, which
XLA:CPU hands to Eigen without transposing either (no copies), and the forward and input-gradient products
are the plain 2-D (N, K) x (K, M) and (N, M) x (M, K) products they were. Only reshapes of contiguous axes
are added, which XLA compiles to bitcasts: values, gradients and forward-mode derivatives (JVPs, AdaHessian's
Hessian-vector products) are those of `lax.dot_general` (tests/models/canonical_dot_test.py checks them).
Products whose axes are not in that order (contracted axes not trailing on the left or not leading on the
right), with batch dimensions (attention scores), or with extra keyword arguments (e.g. `out_sharding`) go
to `lax.dot_general` unchanged.

The switch is the environment variable `JAXPEFT_CANONICAL_DOT` ('0' off; '1' or unset: on), read when a
layer is traced. (Until 2026-12-07 the module instead transposed x behind an optimization barrier in a
custom JVP; XLA's layout assignment undid that transpose, the dot stayed on Eigen, and it measured no gain
at the MiniLM size, so it was off by default.)
"""

import math
from collections.abc import Sequence

import jax
from jax import lax

from jaxpeft._env_switch import on_unless_zero

ENV_VAR = "JAXPEFT_CANONICAL_DOT"


def enabled() -> bool:
  """Whether layers fold their products to 2-D: `$JAXPEFT_CANONICAL_DOT` is not '0' (unset: on)."""
  return on_unless_zero(ENV_VAR)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]],
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> jax.Array:
  """`lax.dot_general`, computed as one 2-D product over folded axes when `enabled()` (module docstring).

  A drop-in for Flax's `dot_general` layer argument.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  n_free = lhs.ndim - len(lhs_contract)
  foldable = (
      lhs_contract == tuple(range(n_free, lhs.ndim))
      and rhs_contract == tuple(range(len(rhs_contract)))
      and (n_free > 1 or len(lhs_contract) > 1 or rhs.ndim - len(rhs_contract) > 1)
  )
  if kwargs or lhs_batch or rhs_batch or not foldable or not enabled():
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
  free_shape, out_shape = lhs.shape[:n_free], rhs.shape[len(rhs_contract) :]
  k = math.prod(lhs.shape[n_free:])
  product = lax.dot_general(
      lhs.reshape(math.prod(free_shape), k),
      rhs.reshape(k, math.prod(out_shape)),
      (((1,), (0,)), ((), ())),
      precision,
      preferred_element_type,
  )
  return product.reshape(*free_shape, *out_shape)
