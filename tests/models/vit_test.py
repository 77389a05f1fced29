"""The small ViT: shapes, parameter count against its closed form, LoRA on its DenseGeneral attention, VPT."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxpeft.adapters import factored, module_hooks, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from jaxpeft.models.vit import EncoderBlock, ViT

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
  per_block = (
      2 * 2 * D  # two LayerNorms
      + 4 * (D * D + D)  # q, k, v, out kernels and biases
      + D * MLP
      + MLP
      + MLP * D
      + D
  )
  expected = P * P * D + D + (pool == "cls") * D + tokens * D + DEPTH * per_block + 2 * D + D * CLASSES + CLASSES
  assert param_count(params) == expected


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="multiples of patch_size=3"):
    ViT(num_classes=2, patch_size=3, hidden=D, num_heads=HEADS).init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    ViT(num_classes=2, hidden=10, num_heads=4).init(jax.random.key(0), _images())


def test_lora_on_attention_folds_dense_general_and_merge_equals_apply():
  model = _model()
  base = model.init(jax.random.key(0), _images())["params"]
  config = AdapterConfig(
      targets=r".*attention/(query|value|out)/kernel",
      method="lora",
      rank=2,
      alpha=4.0,
      init="random",
      fan_in_axes=FAN_IN,
  )
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


def test_vpt_deep_prompts_follow_the_class_token_that_cls_pooling_reads():
  model = _model()
  base = model.init(jax.random.key(0), _images())["params"]
  base["cls_token"] = jax.random.normal(jax.random.key(3), base["cls_token"].shape)
  p = 3
  config = AdapterConfig(targets=r"block_\d+/ln_attention/scale", method="vpt", rank=p, options={"patch_size": P})
  adapter = reparam.init(jax.random.key(2), config, base)
  with module_hooks.intercept(base, adapter, config):
    ours = model.apply({"params": base}, _images())

  # By hand: patch embedding, [CLS, patches] + E_pos; before block 0 insert [CLS, P_0, patches], before each
  # later block replace the previous prompts' outputs by P_i; final LayerNorm and head on token 0.
  np_base = jax.tree.map(np.asarray, base)
  x, n, side = np.asarray(_images()), 3, 8 // P
  patches = x.reshape(n, side, P, side, P, 1).transpose(0, 1, 3, 2, 4, 5).reshape(n, side * side, P * P)
  z = patches @ np_base["patch_embed"]["kernel"].reshape(P * P, D) + np_base["patch_embed"]["bias"]
  z = np.concatenate([np.broadcast_to(np_base["cls_token"], (n, 1, D)), z], axis=1) + np_base["pos_embedding"]
  for i in range(DEPTH):
    prompt = np.broadcast_to(np.asarray(adapter[f"block_{i}"]["ln_attention"]["scale"]["prompt"]), (n, p, D))
    z = np.concatenate([z[:, :1], prompt, z[:, 1 if i == 0 else 1 + p :]], axis=1)
    z = np.asarray(EncoderBlock(HEADS, MLP).apply({"params": base[f"block_{i}"]}, z))
  cls = z[:, 0]
  cls = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True) + 1e-6)
  cls = cls * np_base["norm"]["scale"] + np_base["norm"]["bias"]
  expected = cls @ np_base["head"]["kernel"] + np_base["head"]["bias"]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(ours, model.apply({"params": base}, _images()), atol=1e-3)
