"""Hot-swapping: adapters of ranks 2, 4, 8 padded to 8 share one compiled step and keep their outputs."""

import jax
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.hot_swap import pad_to_rank
from tests.adapters import tiny_models as tm

MODEL = tm.TinyTransformer()
TOKENS = tm.tokens()
BASE = tm.init_params(MODEL, TOKENS)


def _config(rank, alpha, use_rslora=False, **kw):
  return AdapterConfig(
      targets=r"(embed/embedding|dense/kernel|query/kernel)",
      rank=rank,
      alpha=alpha,
      use_rslora=use_rslora,
      init="random",
      fan_in_axes=tm.ATTENTION_FAN_IN,
      **kw,
  )


ADAPTERS = [
    (c, reparam.init(jax.random.key(i), c, BASE))
    for i, c in enumerate(
        [_config(2, 3.0), _config(4, 16.0, use_rslora=True), _config(8, 8.0, rank_pattern={"query/kernel": 5})]
    )
]


def test_three_ranks_one_compilation_same_outputs():
  traces = []

  def forward(params, adapter, tokens, config):
    traces.append(config)
    return MODEL.apply({"params": reparam.apply(params, adapter, config)}, tokens)

  jitted = jax.jit(forward, static_argnums=3)
  for config, adapter in ADAPTERS:
    padded, padded_cfg = pad_to_rank(BASE, adapter, config, max_rank=8)
    got = jitted(BASE, padded, TOKENS, padded_cfg)
    want = MODEL.apply({"params": reparam.apply(BASE, adapter, config)}, TOKENS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(np.asarray(want) - np.asarray(MODEL.apply({"params": BASE}, TOKENS))).max() > 1e-3
  assert len(traces) == 1
  assert jitted._cache_size() == 1
  for config, adapter in ADAPTERS:  # the counter can tell: without padding every adapter recompiles
    jitted(BASE, adapter, TOKENS, config)
  assert len(traces) == 1 + 3


def test_padding_is_zero_and_scale_folded():
  config, adapter = ADAPTERS[1]
  padded, padded_cfg = pad_to_rank(BASE, adapter, config, max_rank=8)
  assert padded_cfg.rank == 8 and padded_cfg.alpha == 8.0 and not padded_cfg.use_rslora
  a, b = adapter["dense"]["kernel"]["a"], adapter["dense"]["kernel"]["b"]
  pa, pb = padded["dense"]["kernel"]["a"], padded["dense"]["kernel"]["b"]
  np.testing.assert_array_equal(pa[:, :4], a)
  np.testing.assert_array_equal(pa[:, 4:], 0.0)
  np.testing.assert_allclose(pb[:4], 16.0 / np.sqrt(4) * np.asarray(b), rtol=1e-6)
  np.testing.assert_array_equal(pb[4:], 0.0)


def test_bad_inputs_are_refused():
  config, adapter = ADAPTERS[2]
  with pytest.raises(ValueError, match=r"max_rank=4 is smaller than the rank of .*'dense/kernel': 8"):
    pad_to_rank(BASE, adapter, config, max_rank=4)
  dora = AdapterConfig(targets="dense/kernel", method="dora", rank=2)
  with pytest.raises(ValueError, match="handles LoRA adapters"):
    pad_to_rank(BASE, reparam.init(jax.random.key(0), dora, BASE), dora, 8)
  pissa = AdapterConfig(targets="dense/kernel", rank=2, init="pissa")
  _, pissa_adapter = reparam.init_with_base(jax.random.key(0), pissa, BASE)
  with pytest.raises(ValueError, match="residual base"):
    pad_to_rank(BASE, pissa_adapter, pissa, 8)
