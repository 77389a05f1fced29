"""A `lax.dot_general` for Dense layers whose weight-gradient product reaches XLA:CPU as one fast 2-D matrix product.

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
are the plain 2-D (N, K) x (K, M) and (N, M) x (M, K) products they were.

A product that narrows the features (M < K: a LoRA factor `a` of shape (d_in, r), an MLP's down-projection, a
classifier head) is computed as `x2 . (W2^T)^T`, with `W2^T` materialised behind `lax.optimization_barrier`.
Its weight gradient is then `(dy2^T x2)^T`: XLA:CPU computes `dy2^T x2`, a product with few rows, fast (its
own barrier keeps XLA from folding the final transpose of the small (M, K) result back into the dot),
instead of `x2^T dy2`, a product with few columns, which Eigen ran at 6-14 GFLOP/s for M = 8 (d_in 1536 and
384; 8192 tokens). Measured in one process on one core, 2026-12-07: forward plus both gradients of `x W` at
8192 tokens took 0.52x the plain time for (384, 8), 0.34x for (1536, 8), 0.78x for (1536, 128), 0.93x for
(1536, 384); for M >= K it was no faster (1.00x for (384, 384), 1.09x for (384, 1536)), hence the rule.

Only reshapes, a transposed copy of the (small) weight and barriers are added: values, gradients and
forward-mode derivatives (JVPs, AdaHessian's Hessian-vector products) are those of `lax.dot_general` up to
float rounding (tests/canonical_dot_test.py checks them). `matmul(x, w)` is `x @ w` through the same
`dot_general`; the adapter methods' activation-hook branches (LoRA, DoRA, SoRA, ...) use it for their
low-rank products.

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
  in_order = lhs_contract == tuple(range(n_free, lhs.ndim)) and rhs_contract == tuple(range(len(rhs_contract)))
  if kwargs or lhs_batch or rhs_batch or not in_order or not enabled():
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
  free_shape, out_shape = lhs.shape[:n_free], rhs.shape[len(rhs_contract) :]
  k, m = math.prod(lhs.shape[n_free:]), math.prod(out_shape)
  lhs2, rhs2 = lhs.reshape(math.prod(free_shape), k), rhs.reshape(k, m)
  if m < k:
    product = lax.dot_general(
        lhs2, lax.optimization_barrier(rhs2.T), (((1,), (1,)), ((), ())), precision, preferred_element_type
    )
  else:
    product = lax.dot_general(lhs2, rhs2, (((1,), (0,)), ((), ())), precision, preferred_element_type)
  return product.reshape(*free_shape, *out_shape)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` for a matrix `w`, through `dot_general`."""
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
