"""quantize_tree / dequantize_tree: regex selection like adapters, errors naming the leaf, jit, bytes per weight,
and the trainable-set check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import quantize

PARAMS = {
    "encoder": {
        "query": {"kernel": jax.random.normal(jax.random.key(0), (32, 64)), "bias": jnp.zeros(64)},
        "value": {"kernel": jax.random.normal(jax.random.key(1), (32, 64), jnp.bfloat16)},
    },
    "head": {"kernel": jnp.ones((64, 3))},
}


def test_selects_by_full_match_and_leaves_the_rest():
  q = quantize.quantize_tree(PARAMS, r"encoder/.*/kernel", "nf4", 64)
  assert quantize.quantized_paths(q) == ["encoder/query/kernel", "encoder/value/kernel"]
  assert (
      q["head"]["kernel"] is PARAMS["head"]["kernel"]
      and q["encoder"]["query"]["bias"] is PARAMS["encoder"]["query"]["bias"]
  )
  back = jax.jit(quantize.dequantize_tree)(q)
  assert back["encoder"]["value"]["kernel"].dtype == jnp.bfloat16
  # within NF4's bound of each block's absmax
  w = np.asarray(PARAMS["encoder"]["query"]["kernel"]).reshape(-1, 64)
  err = np.abs(np.asarray(back["encoder"]["query"]["kernel"]).reshape(-1, 64) - w)
  assert np.all(err <= 0.1519 * np.abs(w).max(1, keepdims=True) + 1e-7)


def test_bytes_per_param():
  kernels = {"a": {"kernel": jnp.ones((64, 64))}}
  assert quantize.bytes_per_param(kernels) == 4.0
  assert quantize.bytes_per_param(quantize.quantize_tree(kernels, ".*", "nf4", 64)) == 0.5 + 4 / 64
  assert quantize.bytes_per_param(quantize.quantize_tree(kernels, ".*", "int8")) == 1 + 4 / 64


def test_pattern_matching_nothing_lists_the_paths():
  with pytest.raises(ValueError, match=r"matches no parameter(.|\n)*encoder/query/kernel \(32, 64\)"):
    quantize.quantize_tree(PARAMS, r".*/weight")


@pytest.mark.parametrize(
    "pattern, block_size, message",
    [
        (r"encoder/query/.*", 64, "'encoder/query/bias' has shape \\(64,\\): 1-D leaves"),
        (
            r"head/kernel",
            128,
            "'head/kernel' of shape \\(64, 3\\) has 192 entries, not a multiple of block_size=128",
        ),
    ],
)
def test_bad_leaves_name_the_leaf(pattern, block_size, message):
  with pytest.raises(ValueError, match=message):
    quantize.quantize_tree(PARAMS, pattern, "nf4", block_size)


def test_quantized_leaf_in_the_trainable_set_raises():
  q = quantize.quantize_tree(PARAMS, r"encoder/.*/kernel", "int4", 32)
  quantize.check_frozen({"head": q["head"]})
  with pytest.raises(ValueError, match=r"contains quantized leaves \['encoder/query/kernel'"):
    quantize.check_frozen({"encoder": q["encoder"]})
