"""Parity with Hugging Face PEFT (PyTorch, CPU) for LoRA, rsLoRA and DoRA, and for LoRA's inits.

The same base weights and the same adapter weights go into a PEFT-wrapped torch layer and into a Flax
layer adapted by jaxpeft; outputs must agree to 1e-5 in float32, before and after merging.
Transposition rules (see ``jaxpeft.adapters.methods.lora``):
  Linear    kernel = W.T, a = lora_A.T, b = lora_B.T
  Conv2d    kernel = W.permute(2, 3, 1, 0), a = lora_A.permute(2, 3, 1, 0).reshape(-1, r), b = lora_B[:, :, 0, 0].T
  Embedding embedding = W, a = lora_embedding_A.T, b = lora_embedding_B.T
  DoRA      m = lora_magnitude_vector.weight.reshape(-1)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.selection import select_targets

R, ALPHA = 3, 5.0


class _Wrap(torch.nn.Module):

  def __init__(self, layer):
    super().__init__()
    self.layer = layer

  def forward(self, x):
    return self.layer(x)


def _peft(layer, use_dora, use_rslora, init=False):
  torch.manual_seed(0)
  config = peft.LoraConfig(
      r=R,
      lora_alpha=ALPHA,
      target_modules=["layer"],
      use_dora=use_dora,
      use_rslora=use_rslora,
      init_lora_weights=init,
  )
  model = peft.get_peft_model(_Wrap(layer), config)
  model.eval()
  lora_layer = model.base_model.model.layer
  if use_dora:  # move the magnitude away from its init so it matters
    with torch.no_grad():
      m = lora_layer.lora_magnitude_vector["default"].weight
      m.mul_(torch.linspace(0.5, 1.5, m.numel()).reshape(m.shape))
  return model, lora_layer


def _t(x):
  return np.asarray(x.detach().numpy(), np.float32)


def _config(use_dora, use_rslora, targets, **kw):
  return AdapterConfig(
      targets=targets, method="dora" if use_dora else "lora", rank=R, alpha=ALPHA, use_rslora=use_rslora, **kw
  )


def _magnitude(lora_layer, adapter, use_dora):
  if use_dora:
    adapter["m"] = jnp.asarray(_t(lora_layer.lora_magnitude_vector["default"].weight).reshape(-1))
  return adapter


VARIANTS = pytest.mark.parametrize(
    "use_dora,use_rslora", [(False, False), (False, True), (True, False), (True, True)]
)


@VARIANTS
def test_linear(use_dora, use_rslora):
  torch.manual_seed(1)
  model, layer = _peft(torch.nn.Linear(6, 5), use_dora, use_rslora)
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  params = {"kernel": jnp.asarray(_t(layer.base_layer.weight).T), "bias": jnp.asarray(_t(layer.base_layer.bias))}
  adapter = {
      "kernel": _magnitude(
          layer,
          {
              "a": jnp.asarray(_t(layer.lora_A["default"].weight).T),
              "b": jnp.asarray(_t(layer.lora_B["default"].weight).T),
          },
          use_dora,
      )
  }
  cfg = _config(use_dora, use_rslora, "kernel")
  dense = nn.Dense(5)
  expect = _t(model(torch.from_numpy(x)))
  ours = dense.apply({"params": reparam.apply(params, adapter, cfg)}, x)
  np.testing.assert_allclose(ours, expect, atol=1e-5, rtol=1e-5)
  assert not np.allclose(expect, dense.apply({"params": params}, x), atol=1e-3)  # the adapter matters
  with factored.intercept(params, adapter, cfg):
    np.testing.assert_allclose(dense.apply({"params": params}, x), expect, atol=1e-5, rtol=1e-5)
  merged_torch = model.merge_and_unload().layer
  merged = reparam.merge(params, adapter, cfg)
  np.testing.assert_allclose(merged["kernel"], _t(merged_torch.weight).T, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
      dense.apply({"params": merged}, x), _t(merged_torch(torch.from_numpy(x))), atol=1e-5, rtol=1e-5
  )


@VARIANTS
def test_conv2d(use_dora, use_rslora):
  torch.manual_seed(2)
  model, layer = _peft(torch.nn.Conv2d(3, 4, 3, padding=1), use_dora, use_rslora)
  x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)  # NCHW
  params = {
      "kernel": jnp.asarray(_t(layer.base_layer.weight).transpose(2, 3, 1, 0)),
      "bias": jnp.asarray(_t(layer.base_layer.bias)),
  }
  a = _t(layer.lora_A["default"].weight).transpose(2, 3, 1, 0).reshape(-1, R)
  b = _t(layer.lora_B["default"].weight)[:, :, 0, 0].T
  adapter = {"kernel": _magnitude(layer, {"a": jnp.asarray(a), "b": jnp.asarray(b)}, use_dora)}
  cfg = _config(use_dora, use_rslora, "kernel", fan_in_axes={"kernel": 3})
  conv = nn.Conv(4, (3, 3), padding=1)
  expect = _t(model(torch.from_numpy(x))).transpose(0, 2, 3, 1)
  ours = conv.apply({"params": reparam.apply(params, adapter, cfg)}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(ours, expect, atol=1e-5, rtol=1e-5)
  merged_torch = model.merge_and_unload().layer
  merged = reparam.merge(params, adapter, cfg)
  np.testing.assert_allclose(merged["kernel"], _t(merged_torch.weight).transpose(2, 3, 1, 0), atol=1e-5, rtol=1e-5)


@VARIANTS
def test_embedding(use_dora, use_rslora):
  torch.manual_seed(3)
  model, layer = _peft(torch.nn.Embedding(11, 6), use_dora, use_rslora)
  ids = np.array([[0, 3, 10, 7], [1, 1, 5, 2]])
  params = {"embedding": jnp.asarray(_t(layer.base_layer.weight))}
  adapter = {
      "embedding": _magnitude(
          layer,
          {
              "a": jnp.asarray(_t(layer.lora_embedding_A["default"]).T),
              "b": jnp.asarray(_t(layer.lora_embedding_B["default"]).T),
          },
          use_dora,
      )
  }
  cfg = _config(use_dora, use_rslora, "embedding")
  embed = nn.Embed(11, 6)
  expect = _t(model(torch.from_numpy(ids)))
  np.testing.assert_allclose(
      embed.apply({"params": reparam.apply(params, adapter, cfg)}, ids), expect, atol=1e-5, rtol=1e-5
  )
  merged_torch = model.merge_and_unload().layer
  np.testing.assert_allclose(
      reparam.merge(params, adapter, cfg)["embedding"], _t(merged_torch.weight), atol=1e-5, rtol=1e-5
  )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling(use_rslora):
  _, layer = _peft(torch.nn.Linear(6, 5), False, use_rslora)
  (target,) = select_targets(_config(False, use_rslora, "kernel"), {"kernel": jnp.zeros((6, 5))})
  assert target.scaling == pytest.approx(layer.scaling["default"], rel=1e-12)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_distributions_match_peft(init):
  d_in, d_out, r = 1024, 64, 32
  config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=["layer"], init_lora_weights=init)
  torch.manual_seed(4)
  layer = peft.get_peft_model(_Wrap(torch.nn.Linear(d_in, d_out)), config).base_model.model.layer
  a_t, b_t = _t(layer.lora_A["default"].weight), _t(layer.lora_B["default"].weight)
  cfg = AdapterConfig(targets="kernel", rank=r, alpha=8, init="default" if init is True else init)
  ours = reparam.init(jax.random.key(4), cfg, {"kernel": jnp.zeros((d_in, d_out))})["kernel"]
  a, b = np.asarray(ours["a"]), np.asarray(ours["b"])
  np.testing.assert_array_equal(b_t, 0.0)
  np.testing.assert_array_equal(b, 0.0)
  if init is True:  # U(-1/sqrt(d_in), 1/sqrt(d_in)): the same bound, not Flax's he_uniform
    bound = 1 / np.sqrt(d_in)
    assert np.abs(a_t).max() <= bound and np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound
    expected_std = bound / np.sqrt(3)
  else:  # N(0, (1/r)^2)
    expected_std = 1 / r
  np.testing.assert_allclose(a_t.std(), expected_std, rtol=0.02)
  np.testing.assert_allclose(a.std(), expected_std, rtol=0.02)
  np.testing.assert_allclose(a.mean(), 0.0, atol=0.03 * expected_std)  # ~5 standard errors


def test_embedding_init_matches_peft():
  config = peft.LoraConfig(r=64, lora_alpha=8, target_modules=["layer"])
  torch.manual_seed(5)
  layer = peft.get_peft_model(_Wrap(torch.nn.Embedding(512, 256)), config).base_model.model.layer
  ours = reparam.init(
      jax.random.key(5), AdapterConfig(targets="embedding", rank=64), {"embedding": jnp.zeros((512, 256))}
  )["embedding"]
  np.testing.assert_array_equal(_t(layer.lora_embedding_A["default"]), 0.0)
  np.testing.assert_array_equal(ours["a"], 0.0)
  # 16384 draws: the sample std of N(0, 1) is within 3% of 1 with overwhelming probability (~5 sigma)
  np.testing.assert_allclose(_t(layer.lora_embedding_B["default"]).std(), 1.0, rtol=0.03)
  np.testing.assert_allclose(np.asarray(ours["b"]).std(), 1.0, rtol=0.03)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_peft(use_rslora):
  torch.manual_seed(6)
  lin = torch.nn.Linear(10, 12)
  w = _t(lin.weight)
  model, layer = _peft(lin, False, use_rslora, init="pissa")
  cfg = _config(False, use_rslora, "kernel", init="pissa")
  residual, adapter = reparam.init_with_base(jax.random.key(0), cfg, {"kernel": jnp.asarray(w.T)})
  s = layer.scaling["default"]
  delta_t = s * _t(layer.lora_B["default"].weight) @ _t(layer.lora_A["default"].weight)
  np.testing.assert_allclose(
      s * np.asarray(adapter["kernel"]["a"] @ adapter["kernel"]["b"]), delta_t.T, atol=1e-5, rtol=1e-5
  )
  np.testing.assert_allclose(residual["kernel"], _t(layer.base_layer.weight).T, atol=1e-5, rtol=1e-5)
