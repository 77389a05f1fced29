"""Merging LoRA-family updates on ΔW: linear / concatenation / TIES / SVD against numpy and PEFT's merge_utils."""

import re

import jax
import numpy as np
import peft.utils.merge_utils as peft_merge
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.merging.lora_updates import combine, combined_deltas
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import tiny_models as tm

BASE = tm.init_params(tm.TinyTransformer(), tm.tokens())
CFG_1 = AdapterConfig(
    targets=r"(dense|query)/kernel",
    rank=2,
    alpha=3.0,
    init="random",
    fan_in_axes=tm.ATTENTION_FAN_IN,
    rank_pattern={"query/kernel": 3},
)
CFG_2 = AdapterConfig(
    targets=r"(dense|out)/kernel",
    rank=4,
    alpha=2.0,
    use_rslora=True,
    init="random",
    fan_in_axes=tm.ATTENTION_FAN_IN,
)
ADAPTERS = [
    (CFG_1, reparam.init(jax.random.key(1), CFG_1, BASE)),
    (CFG_2, reparam.init(jax.random.key(2), CFG_2, BASE)),
]
WEIGHTS = [0.7, -1.3]
SHAPES = {"dense/kernel": (8, 8), "query/kernel": (8, 8), "out/kernel": (8, 8)}


def _numpy_deltas(config, adapter):
  """ΔW = s a b per module, by hand in float64 (s = alpha/r or alpha/sqrt(r), per-module rank)."""
  out = {}
  for path in SHAPES:
    if not re.fullmatch(config.targets, path):
      continue
    leaf = adapter
    for part in path.split("/"):
      leaf = leaf[part]
    a, b = np.asarray(leaf["a"], np.float64), np.asarray(leaf["b"], np.float64)
    r = a.shape[1]
    out[path] = config.alpha / (np.sqrt(r) if config.use_rslora else r) * a @ b
  return out


def _reference(combination):
  per = [_numpy_deltas(c, p) for c, p in ADAPTERS]
  stacks = {p: [d.get(p, np.zeros(SHAPES[p])) for d in per] for p in SHAPES}
  if combination == "linear":
    return {p: sum(w * d for w, d in zip(WEIGHTS, s)) for p, s in stacks.items()}
  return {
      p: peft_merge.ties(
          [torch.tensor(d) for d in s],
          torch.tensor(WEIGHTS, dtype=torch.float64),
          density=0.4,
          majority_sign_method="total",
      ).numpy()
      for p, s in stacks.items()
  }


def _delta_of(adapter, config):
  return {p: np.asarray(v) for p, v in combined_deltas(BASE, [(config, adapter)], [1.0]).items()}


def test_linear_delta_matches_numpy():
  got = combined_deltas(BASE, ADAPTERS, WEIGHTS)
  want = _reference("linear")
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_allclose(got[p], want[p], atol=1e-6)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_delta_matches_peft(method):
  per = [_numpy_deltas(c, p) for c, p in ADAPTERS]
  got = combined_deltas(BASE, ADAPTERS, WEIGHTS, "ties", density=0.4, majority_sign_method=method)
  for p in SHAPES:
    tensors = [torch.tensor(d.get(p, np.zeros(SHAPES[p])), dtype=torch.float32) for d in per]
    want = peft_merge.ties(tensors, torch.tensor(WEIGHTS), density=0.4, majority_sign_method=method).numpy()
    np.testing.assert_allclose(got[p], want, atol=1e-6)
    assert np.count_nonzero(got[p]) <= 2 * int(0.4 * 64)


def test_concatenation_is_exact_and_sums_ranks():
  adapter, config = combine(BASE, ADAPTERS, WEIGHTS)
  assert config.method == "lora"
  assert {p: adapter[p.split("/")[0]]["kernel"]["a"].shape[-1] for p in SHAPES} == {
      "dense/kernel": 2 + 4,
      "query/kernel": 3,
      "out/kernel": 4,
  }
  want = _reference("linear")
  for p, d in _delta_of(adapter, config).items():
    np.testing.assert_allclose(d, want[p], atol=1e-6)
  merged = reparam.merge(BASE, adapter, config)["out"]["kernel"]
  np.testing.assert_allclose(merged, BASE["out"]["kernel"] + want["out/kernel"].reshape(2, 4, 8), atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, "max"])
def test_svd_truncation_error_equals_discarded_singular_values(rank):
  adapter, config = combine(BASE, ADAPTERS, WEIGHTS, rank=rank)
  want = _reference("linear")
  for p, d in _delta_of(adapter, config).items():
    s = np.linalg.svd(want[p], compute_uv=False)
    r = {"dense/kernel": 4, "query/kernel": 3, "out/kernel": 4}[p] if rank == "max" else rank
    assert adapter[p.split("/")[0]]["kernel"]["a"].shape[-1] == r
    np.testing.assert_allclose(np.linalg.norm(want[p] - d), np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.svd(d, compute_uv=False)[:r], s[:r], rtol=1e-4)


def test_ties_full_rank_svd_reproduces_ties_delta():
  adapter, config = combine(BASE, ADAPTERS, WEIGHTS, "ties", density=0.4)
  want = _reference("ties")
  for p, d in _delta_of(adapter, config).items():
    np.testing.assert_allclose(d, want[p], atol=1e-5)


def test_per_module_ranks_survive_save_and_load(tmp_path):
  adapter, config = combine(BASE, ADAPTERS, WEIGHTS)
  save_adapter(tmp_path / "cat.safetensors", adapter, config)
  loaded, loaded_config = load_adapter(tmp_path / "cat.safetensors", base_params=BASE)
  assert loaded_config == config
  np.testing.assert_array_equal(
      reparam.apply(BASE, loaded, loaded_config)["dense"]["kernel"],
      reparam.apply(BASE, adapter, config)["dense"]["kernel"],
  )


def test_bad_inputs_are_refused():
  dora = AdapterConfig(targets="dense/kernel", method="dora", rank=2)
  with pytest.raises(ValueError, match="no additive weight update"):
    combine(BASE, [(dora, reparam.init(jax.random.key(0), dora, BASE))], [1.0], rank=2)
  loha = AdapterConfig(targets="dense/kernel", method="loha", rank=2)
  with pytest.raises(ValueError, match="Exact concatenation needs LoRA factors"):
    combine(BASE, [(loha, reparam.init(jax.random.key(0), loha, BASE))], [1.0])
  pissa = AdapterConfig(targets="dense/kernel", rank=2, init="pissa")
  with pytest.raises(ValueError, match="residual base"):
    combine(BASE, [(pissa, reparam.init_with_base(jax.random.key(0), pissa, BASE)[1])], [1.0])
  with pytest.raises(ValueError, match="needs density"):
    combine(BASE, ADAPTERS, WEIGHTS, "ties")
  with pytest.raises(ValueError, match="one weight per adapter"):
    combine(BASE, ADAPTERS, [1.0])


def test_scanned_layers_combine_per_layer():
  base = tm.init_params(tm.ScannedMLP(), np.ones((2, tm.WIDTH), np.float32))
  configs = [
      AdapterConfig(targets="layers/dense/kernel", rank=r, alpha=2.0, init="random", stacked_axes={"layers/.*": 1})
      for r in (1, 2)
  ]
  adapters = [(c, reparam.init(jax.random.key(i), c, base)) for i, c in enumerate(configs)]
  per_layer = [
      [
          2.0
          / c.rank
          * np.asarray(p["layers"]["dense"]["kernel"]["a"][k], np.float64)
          @ np.asarray(p["layers"]["dense"]["kernel"]["b"][k], np.float64)
          for k in range(3)
      ]
      for c, p in adapters
  ]
  got = combined_deltas(base, adapters, WEIGHTS, "ties", density=0.5)["layers/dense/kernel"]
  for k in range(3):
    want = peft_merge.ties(
        [torch.tensor(d[k]) for d in per_layer], torch.tensor(WEIGHTS, dtype=torch.float64), density=0.5
    ).numpy()
    np.testing.assert_allclose(got[k], want, atol=1e-6)
  adapter, config = combine(base, adapters, WEIGHTS)
  assert adapter["layers"]["dense"]["kernel"]["a"].shape == (3, tm.WIDTH, 3)
  merged = np.asarray(reparam.merge(base, adapter, config)["layers"]["dense"]["kernel"])
  for k in range(3):
    want = sum(w * d[k] for w, d in zip(WEIGHTS, per_layer))
    np.testing.assert_allclose(merged[k] - np.asarray(base["layers"]["dense"]["kernel"][k]), want, atol=1e-6)
