"""Mixed-adapter batches: example i with adapter index[i] equals running it alone, and PEFT's adapter_names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxpeft.adapters import mixed_batch, reparam
from jaxpeft.adapters.config import AdapterConfig

D_IN, HIDDEN, D_OUT, BATCH, SEQ = 6, 5, 4, 5, 3


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, name="l2")(jnp.tanh(nn.Dense(HIDDEN, name="l1")(x)))


MODEL = MLP()
X = jax.random.normal(jax.random.key(0), (BATCH, SEQ, D_IN))
BASE = MODEL.init(jax.random.key(1), X)["params"]
CONFIGS = [
    AdapterConfig(targets=r"l\d/kernel", rank=2, alpha=3.0, init="random"),
    AdapterConfig(
        targets=r"l\d/kernel", rank=3, alpha=5.0, use_rslora=True, init="random", rank_pattern={"l2/kernel": 1}
    ),
    AdapterConfig(targets=r"l\d/kernel", rank=4, alpha=2.0, init="random"),
]
ADAPTERS = [(c, reparam.init(jax.random.key(10 + i), c, BASE)) for i, c in enumerate(CONFIGS)]
INDEX = jnp.array([2, -1, 0, 1, 0])


@jax.jit
def _mixed(params, stacked, x, index):
  with mixed_batch.intercept(params, stacked, CONFIG_STACKED, index):
    return MODEL.apply({"params": params}, x)


STACKED, CONFIG_STACKED = mixed_batch.stack(BASE, ADAPTERS)


def _alone(i, k):
  params = BASE if k == -1 else reparam.apply(BASE, ADAPTERS[k][1], ADAPTERS[k][0])
  return MODEL.apply({"params": params}, X[i : i + 1])[0]


def test_each_example_equals_its_adapter_alone():
  got = _mixed(BASE, STACKED, X, INDEX)
  for i, k in enumerate(INDEX.tolist()):
    np.testing.assert_allclose(got[i], _alone(i, k), atol=1e-5)
  assert not np.allclose(_alone(0, 0), _alone(0, 2), atol=1e-3)


def test_new_mix_reuses_the_compiled_program():
  _mixed(BASE, STACKED, X, INDEX)
  before = _mixed._cache_size()
  got = _mixed(BASE, STACKED, X, jnp.array([1, 1, 2, -1, 0]))
  assert _mixed._cache_size() == before
  np.testing.assert_allclose(got[0], _alone(0, 1), atol=1e-5)


def test_out_of_range_index_gives_nan_not_another_adapter():
  got = _mixed(BASE, STACKED, X, jnp.array([3, -2, 0, 0, 0]))
  assert np.isnan(got[0]).all() and np.isnan(got[1]).all() and np.isfinite(got[2:]).all()


def test_matches_peft_adapter_names():
  class Torch(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.l1, self.l2 = torch.nn.Linear(D_IN, HIDDEN), torch.nn.Linear(HIDDEN, D_OUT)

    def forward(self, x):
      return self.l2(torch.tanh(self.l1(x)))

  def t(x):
    return torch.tensor(np.asarray(x))

  def copy(param, value):
    assert param.shape == value.shape, (param.shape, value.shape)
    param.copy_(value)

  module = Torch()
  with torch.no_grad():
    for name in ("l1", "l2"):
      getattr(module, name).weight.copy_(t(BASE[name]["kernel"]).T)
      getattr(module, name).bias.copy_(t(BASE[name]["bias"]))
  names = ["ad0", "ad1", "ad2"]
  model = None
  for name, (config, _) in zip(names, ADAPTERS):
    peft_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        use_rslora=config.use_rslora,
        target_modules=["l1", "l2"],
        rank_pattern={k.split("/")[0]: r for k, r in config.rank_pattern},
    )
    if model is None:
      model = peft.get_peft_model(module, peft_config, adapter_name=name)
    else:
      model.add_adapter(name, peft_config)
  model.eval()
  with torch.no_grad():
    for name, (_, adapter) in zip(names, ADAPTERS):
      for layer in ("l1", "l2"):
        lora = getattr(model.base_model.model, layer)
        copy(lora.lora_A[name].weight, t(adapter[layer]["kernel"]["a"]).T)
        copy(lora.lora_B[name].weight, t(adapter[layer]["kernel"]["b"]).T)
    adapter_names = ["__base__" if k == -1 else names[k] for k in INDEX.tolist()]
    want = model(t(X), adapter_names=adapter_names).numpy()
  np.testing.assert_allclose(_mixed(BASE, STACKED, X, INDEX), want, atol=1e-5)


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="one index per example"):
    _mixed(BASE, STACKED, X, jnp.array([0, 1]))
  with pytest.raises(ValueError, match="no single merged weight"):
    reparam.apply(BASE, STACKED, CONFIG_STACKED)
  with pytest.raises(ValueError, match="mixed_batch.stack"):
    with mixed_batch.intercept(BASE, ADAPTERS[0][1], CONFIGS[0], INDEX):
      pass
  other = AdapterConfig(targets=r"l1/kernel", rank=2, init="random")
  with pytest.raises(ValueError, match="configs still differ"):
    mixed_batch.stack(BASE, [ADAPTERS[0], (other, reparam.init(jax.random.key(0), other, BASE))])
