"""The small ViT: shapes, parameter count against its closed form, and LoRA on its DenseGeneral attention."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from jaxpeft.models.vit import ViT

D, HEADS, MLP, DEPTH, P, CLASSES = 8, 2, 12, 2, 2, 3
FAN_IN = {r".*attention/(query|key|value)/kernel": 1, r".*attention/out/kernel": 2}


def _model(pool="cls"):
  return ViT(num_classes=CLASSES, patch_size=P, hidden=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, pool=pool)


def _images(n=3):
  return jax.random.uniform(jax.random.key(1), (n, 8, 8, 1))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_logits_shape_and_parameter_count(pool):
  model = _model(pool)
  params = model.init(jax.random.key(0), _images())["params"]
  assert model.apply({"params": params}, _images()).shape == (3, CLASSES)
  tokens = (8 // P) ** 2 + (pool == "cls")
  per_block = (2 * 2 * D  # two LayerNorms
               + 4 * (D * D + D)  # q, k, v, out kernels and biases
               + D * MLP + MLP + MLP * D + D)
  expected = (P * P * D + D + (pool == "cls") * D + tokens * D + DEPTH * per_block + 2 * D
              + D * CLASSES + CLASSES)
  assert param_count(params) == expected


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="multiples of patch_size=3"):
    ViT(num_classes=2, patch_size=3, hidden=D, num_heads=HEADS).init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    ViT(num_classes=2, hidden=10, num_heads=4).init(jax.random.key(0), _images())


def test_lora_on_attention_folds_dense_general_and_merge_equals_apply():
  model = _model()
  base = model.init(jax.random.key(0), _images())["params"]
  config = AdapterConfig(targets=r".*attention/(query|value|out)/kernel", method="lora", rank=2, alpha=4.0,
                         init="random", fan_in_axes=FAN_IN)
  adapter = reparam.init(jax.random.key(2), config, base)
  applied = traverse_util.flatten_dict(reparam.apply(base, adapter, config), sep="/")
  flat_base = traverse_util.flatten_dict(base, sep="/")
  flat_adapter = traverse_util.flatten_dict(adapter, sep="/")
  for path, kernel in flat_base.items():
    if not path.endswith(("query/kernel", "value/kernel", "out/kernel")):
      np.testing.assert_array_equal(applied[path], kernel)
      continue
    # Closed form: the kernel folded to (inputs, outputs) plus (alpha / r) a b, unfolded.
    a, b = np.asarray(flat_adapter[path + "/a"]), np.asarray(flat_adapter[path + "/b"])
    fan_in = 2 if path.endswith("out/kernel") else 1
    matrix = np.asarray(kernel).reshape(int(np.prod(kernel.shape[:fan_in])), -1)
    np.testing.assert_allclose(applied[path], (matrix + 2.0 * a @ b).reshape(kernel.shape), rtol=1e-6, atol=1e-6)
  outputs = model.apply({"params": reparam.apply(base, adapter, config)}, _images())
  merged = model.apply({"params": reparam.merge(base, adapter, config)}, _images())
  np.testing.assert_allclose(merged, outputs, rtol=1e-6, atol=1e-6)
  with factored.intercept(base, adapter, config):  # the adapter as an activation branch instead
    hooked = model.apply({"params": base}, _images())
  np.testing.assert_allclose(hooked, outputs, rtol=1e-5, atol=1e-5)
  assert not np.allclose(outputs, model.apply({"params": base}, _images()), atol=1e-4)
