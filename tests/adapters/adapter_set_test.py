"""AdapterSet: add / select / delete / combine, apply and merge of the active adapters, save / load, names."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.adapter_set import AdapterSet, load_adapter_set, save_adapter_set
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import tiny_models as tm

MODEL = tm.TinyTransformer()
TOKENS = tm.tokens()
BASE = tm.init_params(MODEL, TOKENS)
CFG_A = AdapterConfig(
    targets=r"(dense|query)/kernel",
    rank=2,
    alpha=4.0,
    init="random",
    fan_in_axes=tm.ATTENTION_FAN_IN,
    rank_pattern={"query/kernel": 3},
)
CFG_B = AdapterConfig(targets=r"dense/kernel", method="loha", rank=2, init="random")
ADAPTER_A = reparam.init(jax.random.key(1), CFG_A, BASE)
ADAPTER_B = reparam.init(jax.random.key(2), CFG_B, BASE)


def _set():
  return AdapterSet.for_model(BASE).add("task_a", CFG_A, ADAPTER_A).add("task_b", CFG_B, ADAPTER_B)


def _close(x, y):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), x, y)


def test_select_apply_merge_unmerge_delete():
  adapters = _set()
  assert list(adapters.adapters) == ["task_a", "task_b"] and adapters.active == ()
  one = adapters.select("task_a")
  _close(one.apply(BASE), reparam.apply(BASE, ADAPTER_A, CFG_A))
  both = adapters.select("task_a", "task_b")
  want = np.asarray(BASE["dense"]["kernel"])
  for config, adapter in [(CFG_A, ADAPTER_A), (CFG_B, ADAPTER_B)]:  # two additive updates add up
    want = want + np.asarray(reparam.apply(BASE, adapter, config)["dense"]["kernel"] - BASE["dense"]["kernel"])
  merged = both.merge(BASE)
  np.testing.assert_allclose(merged["dense"]["kernel"], want, atol=1e-6)
  _close(both.unmerge(merged), BASE)
  fewer = both.delete("task_a")
  assert list(fewer.adapters) == ["task_b"] and fewer.active == ("task_b",)
  assert list(both.adapters) == ["task_a", "task_b"]  # immutable: the old set is unchanged
  with pytest.raises(KeyError, match=r"No adapter named \['nope'\].*has \['task_b'\]"):
    fewer.select("nope")
  with pytest.raises(ValueError, match="No active adapter"):
    adapters.apply(BASE)


def test_combined_adapter_trains_like_any_other():
  adapters = _set().combine("mix", ["task_a", "task_b"], [0.5, 0.5], rank="max")
  config, adapter = adapters.adapters["mix"]
  assert config.method == "lora"
  target = jax.random.normal(jax.random.key(3), MODEL.apply({"params": BASE}, TOKENS).shape)

  def loss(adapter):
    out = MODEL.apply({"params": reparam.apply(BASE, adapter, config)}, TOKENS)
    return jnp.mean((out - target) ** 2)

  tx = optax.adam(1e-2)
  state = tx.init(adapter)
  step = jax.jit(lambda p, s: (lambda l, g: (l, *tx.update(g, s, p)))(*jax.value_and_grad(loss)(p)))
  first = None
  for _ in range(15):
    value, updates, state = step(adapter, state)
    adapter = optax.apply_updates(adapter, updates)
    first = value if first is None else first
  assert float(loss(adapter)) < 0.9 * float(first)


def test_save_load_round_trip_keeps_ranks_and_selection(tmp_path):
  adapters = _set().combine("cat", ["task_a"], [2.0]).select("task_b", "cat")
  save_adapter_set(tmp_path / "set", adapters)
  assert json.loads((tmp_path / "set" / "adapter_set.json").read_text()) == {
      "adapters": ["task_a", "task_b", "cat"],
      "active": ["task_b", "cat"],
  }
  loaded = load_adapter_set(tmp_path / "set", BASE)
  assert loaded.active == ("task_b", "cat")
  for name in adapters.adapters:
    assert loaded.adapters[name][0] == adapters.adapters[name][0]
    jax.tree.map(np.testing.assert_array_equal, loaded.adapters[name][1], adapters.adapters[name][1])
  assert dict(loaded.adapters["task_a"][0].rank_pattern) == {"query/kernel": 3}
  assert loaded.adapters["cat"][1]["query"]["kernel"]["a"].shape == (8, 3)
  _close(loaded.apply(BASE), adapters.apply(BASE))


@pytest.mark.parametrize(
    "name,message",
    [
        ("", "Invalid adapter name"),
        ("a/b", "Invalid adapter name"),
        (".hidden", "Invalid adapter name"),
        ("kernel", "collides with a component of the base parameter path 'dense/kernel'"),
        ("query", "collides with a component of the base parameter path 'query/bias'"),
    ],
)
def test_bad_names_are_refused(name, message):
  with pytest.raises(ValueError, match=message):
    AdapterSet.for_model(BASE).add(name, CFG_A, ADAPTER_A)


def test_strict_loading_reports_a_readable_diff(tmp_path):
  with pytest.raises(ValueError, match="already exists"):
    _set().add("task_a", CFG_A, ADAPTER_A)
  bad = jax.tree.map(lambda x: x, ADAPTER_A)
  bad["dense"]["kernel"]["b"] = bad["dense"]["kernel"]["b"].astype(jnp.bfloat16)
  with pytest.raises(ValueError, match=r"wrong dtype: \['dense/kernel/b: expected float32, got bfloat16'\]"):
    AdapterSet.for_model(BASE).add("task", CFG_A, bad)
  save_adapter_set(tmp_path / "set", _set())
  other_model = {"dense": BASE["dense"], "extra": BASE["out"]}  # no 'query' leaf
  diff = r"Adapter 'task_a' of [\s\S]*unexpected: \['query/kernel/a', 'query/kernel/b'\]"
  with pytest.raises(ValueError, match=diff):
    load_adapter_set(tmp_path / "set", other_model)
  with pytest.raises(ValueError, match=r"matches no parameter[\s\S]*Available paths:[\s\S]*extra/kernel"):
    load_adapter_set(tmp_path / "set", {"extra": BASE["out"]})
  with pytest.raises(FileNotFoundError, match="adapter_set.json"):
    load_adapter_set(tmp_path, BASE)
