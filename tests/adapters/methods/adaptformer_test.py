"""AdaptFormer through module hooks, against the numpy forward pass of the tiny transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import module_hooks, reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import module_hook_checks as mh

M, S = 4, 0.7
CFG = AdapterConfig(targets=r"block_\d+/mlp/fc1/kernel", method="adaptformer", rank=M, options={"scale": S})


def test_init_is_identity_and_distribution():
  model, x, params = mh.model_and_input()
  adapter = reparam.init(jax.random.key(1), CFG, params)
  np.testing.assert_array_equal(
      mh.hooked_apply(model, params, adapter, CFG, x), model.apply({"params": params}, x)
  )
  big = reparam.init(
      jax.random.key(0),
      AdapterConfig(targets="fc1/kernel", method="adaptformer", rank=256),
      {"fc1": {"kernel": jnp.zeros((1024, 8))}},
  )["fc1"]["kernel"]
  bound = 1 / np.sqrt(1024)  # torch kaiming_uniform_(a=sqrt(5)) on down (fan_in = d)
  assert 0.99 * bound < np.abs(big["down"]).max() <= bound
  for name in ("up", "down_bias", "up_bias"):
    np.testing.assert_array_equal(big[name], 0.0)
  count = sum(v.size for v in jax.tree.leaves(adapter))
  assert count == mh.DEPTH * (2 * M * mh.D + M + mh.D)


def test_output_equals_numpy_forward():
  model, x, params = mh.model_and_input()
  adapter = mh.randomize(reparam.init(jax.random.key(1), CFG, params))
  lv = {i: mh.np_tree(adapter[f"block_{i}"]["mlp"]["fc1"]["kernel"]) for i in range(mh.DEPTH)}

  def parallel(i, h, y):  # h: the MLP's input, y: its output
    z = np.maximum(h @ lv[i]["down"] + lv[i]["down_bias"], 0.0) @ lv[i]["up"] + lv[i]["up_bias"]
    return y + S * z

  expect = mh.np_forward(params, x, mlp=parallel)
  assert not np.allclose(expect, mh.np_forward(params, x), atol=1e-2)
  np.testing.assert_allclose(mh.hooked_apply(model, params, adapter, CFG, x), expect, rtol=1e-5, atol=1e-5)


def test_training_and_checkpoint(tmp_path):
  model, x, params = mh.model_and_input()
  mh.check_training_reduces_loss(model, x, params, CFG)
  mh.check_checkpoint_round_trip(
      tmp_path, model, x, params, mh.randomize(reparam.init(jax.random.key(1), CFG, params)), CFG
  )


def test_errors():
  model, x, params = mh.model_and_input()
  with pytest.raises(ValueError, match="2-D kernel of the MLP's first Dense"):
    reparam.init(jax.random.key(0), AdapterConfig(targets=r".*ln2/scale", method="adaptformer"), params)
  cfg = AdapterConfig(targets=r"block_0/(mlp/fc1|mlp/fc2)/kernel", method="adaptformer")
  with pytest.raises(ValueError, match="hook the same module 'block_0/mlp'"):
    mh.hooked_apply(model, params, reparam.init(jax.random.key(0), cfg, params), cfg, x)
  cfg = AdapterConfig(targets=r"block_0/mlp/fc2/kernel", method="adaptformer")  # d = HIDDEN != block width
  with pytest.raises(ValueError, match="AdaptFormer needs both to equal"):
    mh.hooked_apply(model, params, reparam.init(jax.random.key(0), cfg, params), cfg, x)
  cfg = AdapterConfig(targets=r"block_0/q/kernel", method="adaptformer")  # the hook would wrap the whole block
  with pytest.raises(ValueError, match=r"'block_0', which is not an MLP \(it has submodules \['mlp'\]"):
    mh.hooked_apply(model, params, reparam.init(jax.random.key(0), cfg, params), cfg, x)


# ---- the library's models, against torch transcriptions of the reference's adapter placement ----------------
# ShoufaChen/AdaptFormer models/custom_modules.py, Block.forward with ffn_option="parallel": the adapter reads the
# residual stream x that enters the MLP branch (before norm2) and its output is added to the branch's output,
# before `residual + x`. Adapter: up(relu(down(x))) * scale, adapter_layernorm_option="none".


def _torch_adapter(leaves, x):
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  return torch.relu(x @ t(leaves["down"]) + t(leaves["down_bias"])) @ t(leaves["up"]) + t(leaves["up_bias"])


def _torch_vit_block(p, x, adapter, scale):
  """The reference Block (parallel AdaptFormer) with the weights of jaxpeft.models.vit.EncoderBlock."""
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  ln = lambda q, z: torch.nn.functional.layer_norm(z, z.shape[-1:], t(q["scale"]), t(q["bias"]), eps=1e-6)
  att = p["attention"]
  h = ln(p["ln_attention"], x)
  q, k, v = (
      torch.einsum("btd,dhe->bhte", h, t(att[n]["kernel"])) + t(att[n]["bias"])[:, None]
      for n in ("query", "key", "value")
  )
  w = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), dim=-1)
  x = x + torch.einsum("bhte,hed->btd", w @ v, t(att["out"]["kernel"])) + t(att["out"]["bias"])
  adapt_x = scale * _torch_adapter(adapter, x)
  residual = x
  mlp = p["mlp"]
  y = torch.nn.functional.gelu(ln(mlp["ln"], x) @ t(mlp["fc1"]["kernel"]) + t(mlp["fc1"]["bias"]))
  y = y @ t(mlp["fc2"]["kernel"]) + t(mlp["fc2"]["bias"])
  return residual + (y + adapt_x)


def test_vit_block_matches_reference_placement():
  from jaxpeft.models.vit import EncoderBlock

  block, x = EncoderBlock(num_heads=2, mlp_dim=12), jax.random.normal(jax.random.key(4), (2, 5, 8))
  params = block.init(jax.random.key(0), x)["params"]
  cfg = AdapterConfig(targets=r"mlp/fc1/kernel", method="adaptformer", rank=M, options={"scale": S})
  adapter = mh.randomize(reparam.init(jax.random.key(1), cfg, params))
  with module_hooks.intercept(params, adapter, cfg):
    ours = block.apply({"params": params}, x)
  expect = _torch_vit_block(
      mh.np_tree(params),
      torch.from_numpy(np.asarray(x, np.float64)),
      mh.np_tree(adapter["mlp"]["fc1"]["kernel"]),
      S,
  ).numpy()
  np.testing.assert_allclose(ours, expect, rtol=1e-5, atol=1e-5)
  assert not np.allclose(expect, block.apply({"params": params}, x), atol=1e-3)


def test_bert_matches_reference_placement_on_transformers_bert():
  import transformers  # pylint: disable=g-import-not-at-top

  from jaxpeft.models.bert import BertConfig, BertEncoder
  from jaxpeft.models.hf_loader import params_from_hf

  fields = dict(
      vocab_size=50,
      hidden_size=16,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=24,
      max_position_embeddings=16,
  )
  torch.manual_seed(0)
  theirs = transformers.BertModel(transformers.BertConfig(**fields), add_pooling_layer=False).double().eval()
  model = BertEncoder(BertConfig(**fields))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  params = params_from_hf({k: v.float().numpy() for k, v in theirs.state_dict().items()}, shapes)
  cfg = AdapterConfig(targets=r".*mlp/intermediate/kernel", method="adaptformer", rank=M, options={"scale": S})
  adapter = mh.randomize(reparam.init(jax.random.key(1), cfg, params))
  for i, layer in enumerate(theirs.encoder.layer):  # read the MLP's input, add to its (pre-residual) output
    leaves = mh.np_tree(adapter["encoder"][f"layer_{i}"]["mlp"]["intermediate"]["kernel"])
    seen = {}
    layer.intermediate.register_forward_pre_hook(lambda _, args, seen=seen: seen.update(x=args[0]))
    layer.output.dense.register_forward_hook(
        lambda _, __, y, seen=seen, leaves=leaves: y + S * _torch_adapter(leaves, seen["x"])
    )
  ids = np.random.default_rng(0).integers(0, 50, size=(2, 7))
  with torch.no_grad():
    expect = theirs(input_ids=torch.from_numpy(ids)).last_hidden_state.mean(1).numpy()
  with module_hooks.intercept(params, adapter, cfg):
    ours = model.apply({"params": params}, ids)
  np.testing.assert_allclose(ours, expect, rtol=1e-4, atol=1e-4)
  assert not np.allclose(expect, model.apply({"params": params}, ids), atol=1e-3)
  cfg = AdapterConfig(targets=r".*layer_0/attention/query/kernel", method="adaptformer")
  with pytest.raises(ValueError, match=r"'encoder/layer_0/attention', which is not an MLP \(its projection"):
    mh.hooked_apply(model, params, reparam.init(jax.random.key(0), cfg, params), cfg, ids)
