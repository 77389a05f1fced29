"""Adapter-only checkpoints: safetensors and Orbax round trips, in-process and in a fresh process."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxpeft.adapters import reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import tiny_models as tm

CFG = AdapterConfig(
    targets=r"(dense|query)/kernel",
    method="dora",
    rank=2,
    alpha=4.0,
    use_rslora=True,
    init="random",
    fan_in_axes=tm.ATTENTION_FAN_IN,
    rank_pattern={"query/kernel": 3},
)

_FRESH = """
import json, sys
import numpy as np
from jaxpeft.adapters.checkpoint import load_adapter
from flax import traverse_util
adapter, config = load_adapter(sys.argv[1])
flat = traverse_util.flatten_dict(adapter, sep="/")
sums = {k: float(np.sum(np.asarray(v, np.float64))) for k, v in flat.items()}
print(json.dumps({"config": config.to_dict(), "sums": sums}))
"""


@pytest.fixture(scope="module")
def trained():
  base = tm.init_params(tm.TinyTransformer(), tm.tokens())
  return base, reparam.init(jax.random.key(0), CFG, base)


@pytest.mark.parametrize("name", ["adapter.safetensors", "adapter_orbax"])
def test_round_trip(tmp_path, trained, name):
  base, adapter = trained
  path = tmp_path / name
  save_adapter(path, adapter, CFG)
  loaded, config = load_adapter(path, base_params=base)
  assert config == CFG
  jax.tree.map(np.testing.assert_array_equal, loaded, adapter)
  np.testing.assert_array_equal(
      reparam.apply(base, loaded, config)["query"]["kernel"], reparam.apply(base, adapter, CFG)["query"]["kernel"]
  )
  out = subprocess.run([sys.executable, "-c", _FRESH, str(path)], capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert AdapterConfig.from_dict(result["config"]) == CFG
  for key, value in result["sums"].items():
    path_parts = key.split("/")
    leaf = adapter
    for part in path_parts:
      leaf = leaf[part]
    np.testing.assert_allclose(value, np.sum(np.asarray(leaf, np.float64)), rtol=1e-12)
  assert len(result["sums"]) == 6


def test_mismatch_is_reported_as_a_diff(tmp_path, trained):
  base, adapter = trained
  bad = jax.tree.map(lambda v: v, adapter)
  bad["query"]["kernel"]["a"] = jnp.zeros((8, 5))
  del bad["dense"]["kernel"]["m"]
  path = tmp_path / "bad.safetensors"
  save_adapter(path, bad, CFG)
  diff = r"missing: \['dense/kernel/m'\][\s\S]*query/kernel/a: expected \(8, 3\), got \(8, 5\)"
  with pytest.raises(ValueError, match=diff):
    load_adapter(path, base_params=base)


def test_foreign_files_are_refused(tmp_path):
  path = tmp_path / "foreign.safetensors"
  safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(path))
  with pytest.raises(ValueError, match="not written by jaxpeft"):
    load_adapter(path)
  with pytest.raises(FileNotFoundError):
    load_adapter(tmp_path / "absent")


def test_nnx_adapter_round_trip_keeps_list_index_keys(tmp_path):
  from flax import nnx

  class Stack(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)])

  _, state = nnx.split(Stack(nnx.Rngs(0)))
  cfg = AdapterConfig(targets=r"layers/\d/kernel", rank=2, init="random")
  adapter = reparam.init(jax.random.key(0), cfg, state)
  save_adapter(tmp_path / "nnx", adapter, cfg)
  loaded, config = load_adapter(tmp_path / "nnx", base_params=state)
  assert set(loaded["layers"]) == {"0", "1"}
  jax.tree.map(np.testing.assert_array_equal, loaded, adapter)  # the stored bits come back exactly
  # The applied weights only to float rounding: the loaded leaves are host arrays, and XLA:CPU's dot kernels
  # may round differently with another memory alignment (seen once in CI as a 1-ulp difference).
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      reparam.apply(state, loaded, config),
      reparam.apply(state, adapter, cfg),
  )
