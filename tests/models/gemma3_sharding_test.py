"""Gemma 3 on a data x model mesh of 8 fake CPU devices: the LoRA loss and its gradient equal the
single-device values, and the rules really split the kernels and their adapter factors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft.adapters import AdapterConfig, reparam
from jaxpeft.models import gemma3, gemma3_loader, gemma3_sharding, tensor_parallel

_LORA = AdapterConfig(r".*attn/(q|k|v|o)_proj/kernel|.*mlp/(gate|up|down)_proj/kernel", rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def setup(tiny_gemma3_hf):
  hf_model, tensors = tiny_gemma3_hf
  config = gemma3.Gemma3Config.from_hf_dict(hf_model.config.to_dict())
  params = gemma3_loader.params_from_hf(tensors, config)
  adapter = reparam.init(jax.random.key(0), _LORA, params)
  adapter = jax.tree.map(lambda x: x + 0.05, adapter)  # non-zero b
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (8, 12)))
  model = gemma3.Gemma3(config)

  def loss(adapter, params, ids):
    logits = model.apply({"params": reparam.apply(params, adapter, _LORA)}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  value_and_grad = jax.value_and_grad(loss)
  return params, adapter, ids, value_and_grad, jax.jit(value_and_grad)(adapter, params, ids)


@pytest.mark.parametrize("data,model", [(2, 4), (8, 1)])
def test_sharded_loss_equals_single_device(setup, data, model):
  params, adapter, ids, value_and_grad, (expected_loss, expected_grad) = setup
  mesh, rules = tensor_parallel.make_mesh(data, model), gemma3_sharding.RULES
  param_shardings = tensor_parallel.shardings(tensor_parallel.param_specs(params, rules, mesh), mesh)
  adapter_specs = tensor_parallel.adapter_specs(adapter, _LORA, params, rules, mesh)
  adapter_shardings = tensor_parallel.shardings(adapter_specs, mesh)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tensor_parallel.DATA_AXIS))
  sharded = jax.device_put((adapter, params, ids), (adapter_shardings, param_shardings, batch))
  loss, grad = jax.jit(
      value_and_grad,
      in_shardings=(adapter_shardings, param_shardings, batch),
      out_shardings=(None, adapter_shardings),
  )(*sharded)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, expected_grad)
  q = sharded[1]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  lora_b = sharded[0]["layers_0"]["self_attn"]["q_proj"]["kernel"]["b"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  assert lora_b.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert q.addressable_shards[0].data.shape == (32 // data, 32 // model)
  assert lora_b.addressable_shards[0].data.shape == (2, 32 // model)


def test_mesh_larger_than_devices_is_an_error():
  with pytest.raises(ValueError, match="needs 16 devices"):
    tensor_parallel.make_mesh(4, 4)
