"""Adapters on quantized bases: a LoRA on an NF4 base equals PEFT on a bitsandbytes Linear4bit (same codes), in
the reparameterized and the factored mode; every weight-space method of the registry trains on an NF4 base
(loss falls) and merges back within the format's error bound."""

import importlib
import inspect
import pathlib
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import bitsandbytes as bnb
from peft import LoraConfig, get_peft_model

import jaxpeft.adapters
from jaxpeft import quantize
from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod
from jaxpeft.adapters.module_hooks import ModuleHookMethod
from jaxpeft.adapters.selection import named_leaves, select_targets
from jaxpeft.quantize.codebooks import NF4, half_gap

D_IN, D_OUT, RANK = 128, 64, 4


class _Wrap(torch.nn.Module):

  def __init__(self, layer):
    super().__init__()
    self.layer = layer

  def forward(self, x):
    return self.layer(x)


def _peft_on_linear4bit(weight, bias):
  layer = bnb.nn.Linear4bit(
      D_IN, D_OUT, bias=True, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4"
  )
  layer.weight = bnb.nn.Params4bit(
      weight, requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
  )
  layer.bias = torch.nn.Parameter(bias)
  layer = layer.to("cpu")  # quantizes
  torch.manual_seed(0)
  model = get_peft_model(
      _Wrap(layer), LoraConfig(target_modules=["layer"], r=RANK, lora_alpha=8, init_lora_weights=False)
  )
  # train mode: in eval mode, on CPUs with AVX512-BF16, Linear4bit repacks the weight for a bfloat16 kernel
  # (a different computation); lora_dropout is 0, so train mode adds nothing random.
  return model.train(), layer.weight


def test_lora_on_nf4_base_equals_peft_bitsandbytes():
  rng = np.random.RandomState(0)
  weight = torch.tensor(rng.standard_normal((D_OUT, D_IN)).astype(np.float32) * 0.05)
  bias = torch.tensor(rng.standard_normal(D_OUT).astype(np.float32) * 0.1)
  model, params4bit = _peft_on_linear4bit(weight, bias)
  state = params4bit.quant_state
  # Our quantizer gives the same codes for the Flax kernel (transposed storage) ...
  ours = quantize.quantize_array(jnp.asarray(weight.numpy().T), "nf4", 64, double_quant=True, transposed=True)
  np.testing.assert_array_equal(np.asarray(ours.codes), params4bit.data.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(ours.scales), state.absmax.numpy())
  # ... and the model runs on bitsandbytes' own codes and statistics.
  kernel = quantize.QuantizedArray(
      codes=jnp.asarray(params4bit.data.numpy().reshape(-1)),
      scales=jnp.asarray(state.absmax.numpy()),
      scale_scales=jnp.asarray(state.state2.absmax.numpy()),
      scale_offset=jnp.asarray(state.offset.numpy()),
      fmt="nf4",
      shape=(D_IN, D_OUT),
      dtype="float32",
      block_size=64,
      transposed=True,
  )
  qbase = {"layer": {"kernel": kernel, "bias": jnp.asarray(bias.numpy())}}
  lora = model.base_model.model.layer
  adapter = {
      "layer": {
          "kernel": {
              "a": jnp.asarray(lora.lora_A["default"].weight.detach().numpy().T),
              "b": jnp.asarray(lora.lora_B["default"].weight.detach().numpy().T),
          }
      }
  }
  config = AdapterConfig(targets="layer/kernel", rank=RANK, alpha=8.0)
  x = rng.standard_normal((5, D_IN)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.tensor(x)).numpy()

  @jax.jit
  def reparameterized(qbase, adapter, x):
    return _OneLayer().apply({"params": quantize.apply(qbase, adapter, config)}, x)

  @jax.jit
  def activation_hook(qbase, adapter, x):
    params = quantize.dequantize_tree(qbase)
    with factored.intercept(params, adapter, config):
      return _OneLayer().apply({"params": params}, x)

  np.testing.assert_allclose(np.asarray(reparameterized(qbase, adapter, x)), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(activation_hook(qbase, adapter, x)), want, rtol=1e-5, atol=1e-5)


def _weight_space_methods() -> list[str]:
  """Every registered method of ``jaxpeft.adapters`` (subpackages included) that is not a module hook."""
  names = set()
  for info in pkgutil.walk_packages(jaxpeft.adapters.__path__, "jaxpeft.adapters."):
    for cls in vars(importlib.import_module(info.name)).values():
      if (
          inspect.isclass(cls)
          and issubclass(cls, AdapterMethod)
          and not issubclass(cls, ModuleHookMethod)
          and vars(cls).get("name")
      ):
        names.add(cls.name)
  return sorted(names)


# Config needs of single methods; everything else gets rank 2 on the Dense kernels (or, if the method only
# adapts conv kernels, on the conv kernel).
_OPTIONS = {"allora": {"eta": 4.0}, "nola": {"num_basis_a": 8, "num_basis_b": 8}}  # nola: fewer bases, faster
_TARGETS = {"bitfit": r"dense_\d/bias"}  # BitFit trains the (unquantized) biases of the quantized layers
# Not trained by gradient steps, so not in the training test: it runs a batch through adapters trained before.
_NOT_TRAINABLE = {"mixed_batch"}


class _OneLayer(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, name="layer")(x)


class _ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(8, (3, 3), padding=1, name="conv")(x)).reshape(x.shape[0], -1)
    return nn.Dense(4, name="dense_1")(jnp.tanh(nn.Dense(16, name="dense_0")(x)))


_X = jax.random.normal(jax.random.key(1), (32, 2, 2, 4))
_Y = jnp.argmax(_X.reshape(32, -1) @ jax.random.normal(jax.random.key(2), (16, 4)), -1)
_PARAMS = _ConvNet().init(jax.random.key(0), _X[:1])["params"]
_QUANTIZE = dict(pattern=r".*kernel", fmt="nf4", block_size=32, double_quant=True)


def _config(name: str) -> AdapterConfig:
  common = dict(method=name, rank=2, alpha=4.0, options=_OPTIONS.get(name, {}))
  if name in _TARGETS:
    return AdapterConfig(targets=_TARGETS[name], **common)
  config = AdapterConfig(targets=r"dense_\d/kernel", **common)
  try:
    select_targets(config, _PARAMS)
    return config
  except ValueError:
    return AdapterConfig(targets="conv/kernel", fan_in_axes={"conv/kernel": 3}, **common)


def test_the_method_list_is_the_registry():
  methods = _weight_space_methods()
  assert {"lora", "dora", "vera", "loha", "lokr", "hydra"} <= set(methods)
  assert _NOT_TRAINABLE <= set(methods) and set(_OPTIONS) | set(_TARGETS) <= set(methods)


@pytest.mark.parametrize("name", [m for m in _weight_space_methods() if m not in _NOT_TRAINABLE])
def test_method_trains_and_merges_on_nf4_base(name):
  config = _config(name)
  qbase = quantize.quantize_tree(_PARAMS, **_QUANTIZE)
  base = quantize.dequantize_tree(qbase)
  residual, adapter = reparam.init_with_base(jax.random.key(3), config, base)
  if residual is not base:  # PiSSA/CorDA-style inits: the residual base is quantized again (frozen)
    qbase = quantize.quantize_tree(residual, **_QUANTIZE)
  tx = optax.adam(3e-2)

  def loss_fn(adapter, qbase):
    logits = _ConvNet().apply({"params": quantize.apply(qbase, adapter, config)}, _X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, _Y).mean()

  @jax.jit
  def step(adapter, opt_state, qbase):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, qbase)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  opt_state, losses = tx.init(adapter), []
  for _ in range(5):
    adapter, opt_state, loss = step(adapter, opt_state, qbase)
    losses.append(float(loss))
  assert losses[-1] < 0.98 * losses[0], losses

  exact = jax.jit(lambda qbase, adapter: reparam.merge(quantize.dequantize_tree(qbase), adapter, config))(
      qbase, adapter
  )
  largest = max(
      float(jnp.abs(leaf).max())
      for path, leaf in named_leaves(exact)
      if path in {t.path for t in select_targets(config, exact)}
  )
  errors = quantize.merge_error(qbase, adapter, config)
  # NF4 rounding of the merged weight, plus the double-quantized scale's error (<= 0.00703 * max |a - mean a|)
  assert errors["requantized"]["max_abs"] <= (half_gap(NF4) + 0.0071) * largest, errors
  assert errors["bfloat16"]["max_abs"] <= 2.0**-8 * largest, errors


def test_readme_example():
  """The code block under the README's "Quantized frozen bases" heading runs; its adapter trains."""
  readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
  section = readme.split("## Quantized frozen bases", 1)[1]
  namespace = {}
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["loss"] > 0 and quantize.is_quantized(namespace["merged"]["layer"]["kernel"])
  assert namespace["errors"]["requantized"]["max_abs"] > 0
