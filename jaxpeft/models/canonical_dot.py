"""A `lax.dot_general` whose weight-gradient product reaches the compiler in canonical layout.

For a layer `y = x W` (x: (tokens, d_in), W: (d_in, d_out)), reverse mode computes the weight gradient
`dW = x^T dy`, a product contracting the token axis, which is the *leading* axis of both operands. XLA:CPU
hands that dot to Eigen, because its fast dot path (YNNPACK) takes only a left operand contracting its
trailing axes; measured on BERT 4x256 this left about half the train step in Eigen at a third of the speed.

`dot_general` here computes the same values with a custom JVP. The output is `lax.dot_general(x, W)`,
and the tangent is `dx W + x dW` as in `lax`'s own rule, except that `x dW` is written with
`x_t = transpose(x)` to (contracted axes..., free axes...), kept behind `lax.optimization_barrier` so the
compiler cannot fold the transpose back into the dot:

  tangent = dot_general(dx, W) + dot_general(x_t, dW, contract x_t's leading axes)

Its transpose, the weight gradient `dW = dot_general(x_t, dy, contract x_t's trailing axes)`, then has
its left operand contracting its trailing axes (canonical). Forward mode stays exact (`jax.jvp`,
`jax.hessian`, AdaHessian's Hessian-vector products), and only the memory layout of one intermediate
changes, so values and gradients equal `lax.dot_general`'s up to float summation order. Products with
batch dimensions (attention scores, which have no weight) go to `lax.dot_general` unchanged.

Whether layers use it is one switch, `enabled()`: the environment variable `JAXPEFT_CANONICAL_DOT`
('1' on; '0' or unset: off), read when a layer is traced. Off by default: in the harness's train step on
the CPU it measured ~0.95x the step time for full fine-tuning of BERT 4x256 at batch 16 x 64 and nothing
for LoRA or at all-MiniLM-L6-v2's size (benchmarks/train_step.py, README "Train-step speed"), while its
different float summation order moved the flagship's SALT row by 3 test examples over 100 steps (issue
20 allows one).
"""

import functools
import os
from collections.abc import Sequence

import jax
from jax import lax
from jax.custom_derivatives import SymbolicZero

ENV_VAR = "JAXPEFT_CANONICAL_DOT"


def enabled() -> bool:
  """Whether layers use the canonical product: `$JAXPEFT_CANONICAL_DOT` is '1' (unset: off)."""
  value = os.environ.get(ENV_VAR, "")
  if value not in ("", "0", "1"):
    raise ValueError(f"{ENV_VAR}={value!r}: set it to '1' (on), '0' (off), or unset it (off).")
  return value == "1"


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _canonical_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type):
  return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def _canonical_dot_jvp(dimension_numbers, precision, preferred_element_type, primals, tangents):
  lhs, rhs = primals
  lhs_dot, rhs_dot = tangents
  (lhs_contract, rhs_contract), _ = dimension_numbers
  dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=preferred_element_type)
  out = dot(lhs, rhs, dimension_numbers)
  terms = []  # Zero tangents (frozen weights, inputs that do not depend on the parameters) cost nothing.
  if not isinstance(lhs_dot, SymbolicZero):
    terms.append(dot(lhs_dot, rhs, dimension_numbers))
  if not isinstance(rhs_dot, SymbolicZero):
    free = [d for d in range(lhs.ndim) if d not in lhs_contract]
    lhs_t = lax.optimization_barrier(lax.transpose(lhs, (*lhs_contract, *free)))
    terms.append(dot(lhs_t, rhs_dot, ((tuple(range(len(lhs_contract))), rhs_contract), ((), ()))))
  return out, sum(terms[1:], terms[0]) if terms else lax.zeros_like_array(out)


_canonical_dot.defjvp(_canonical_dot_jvp, symbolic_zeros=True)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]],
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> jax.Array:
  """`lax.dot_general` with the weight-gradient product in canonical layout (module docstring) when `enabled()`.

  A drop-in for Flax's `dot_general` layer argument. Extra keyword arguments (e.g. `out_sharding`) and
  products with batch dimensions go to `lax.dot_general` unchanged.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if kwargs or lhs_batch or rhs_batch or not enabled():
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
  dims = ((tuple(lhs_contract), tuple(rhs_contract)), ((), ()))
  return _canonical_dot(lhs, rhs, dims, precision, preferred_element_type)
