"""Tests for the adapter core: selection, config, init/apply/merge/unmerge, nnx, scan, bf16, jit/pmap."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Target, get_method, register_method
from jaxpeft.adapters.selection import select_targets
from tests.adapters import tiny_models as tm

ALL = r"(embed/embedding|dense/kernel|query/kernel|out/kernel)"


@pytest.fixture(scope="module")
def base():
  return tm.init_params(tm.TinyTransformer(), tm.tokens())


def _cfg(**kw):
  kw.setdefault("targets", ALL)
  kw.setdefault("fan_in_axes", tm.ATTENTION_FAN_IN)
  return AdapterConfig(**kw)


def _np_lora(w, a, b, scale):
  """Closed-form LoRA on a kernel of any layout: fold rows = prod(input axes)."""
  w = np.asarray(w, np.float64)
  delta = scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return w + delta.reshape(w.shape)


def test_no_match_lists_available_paths(base):
  with pytest.raises(ValueError, match=r"matches no parameter[\s\S]*dense/kernel \(8, 8\)"):
    select_targets(AdapterConfig(targets="nope"), base)


def test_ambiguous_3d_leaf_needs_fan_in_axes(base):
  with pytest.raises(ValueError, match=r"'query/kernel' has 3 axes.*fan_in_axes"):
    select_targets(AdapterConfig(targets=r"query/kernel"), base)


def test_bias_target_is_refused_by_lora(base):
  with pytest.raises(ValueError, match="dense/bias.*input and output axes"):
    select_targets(AdapterConfig(targets=r"dense/bias"), base)


def test_ambiguous_rank_pattern_is_an_error(base):
  cfg = _cfg(rank_pattern={r"dense/.*": 2, r".*/kernel": 3})
  with pytest.raises(ValueError, match="Ambiguous AdapterConfig.rank_pattern for leaf 'dense/kernel'"):
    select_targets(cfg, base)


def test_unknown_method_and_option(base):
  with pytest.raises(ValueError, match="Unknown adapter method 'nope'"):
    get_method("nope")
  with pytest.raises(ValueError, match="Unknown options"):
    select_targets(_cfg(options={"foo": 1}), base)


def test_non_float_leaf_is_refused():
  with pytest.raises(ValueError, match="'step' is not a floating-point array"):
    select_targets(AdapterConfig(targets="step"), {"step": jnp.zeros((2, 2), jnp.int32)})


def test_config_json_round_trip_and_hashable():
  cfg = _cfg(rank_pattern={"dense/kernel": 4}, alpha_pattern={"out/kernel": 3.0}, use_rslora=True)
  back = AdapterConfig.from_json(cfg.to_json())
  assert back == cfg and hash(back) == hash(cfg)
  with pytest.raises(ValueError, match="Unknown AdapterConfig fields"):
    AdapterConfig.from_dict({**cfg.to_dict(), "extra": 1})
  with pytest.raises(ValueError, match="rank must be a positive int"):
    AdapterConfig(targets="x", rank=0)


def test_adapter_mirrors_paths_and_patterns(base):
  cfg = _cfg(rank=2, rank_pattern={"dense/kernel": 4}, alpha_pattern={"dense/kernel": 12.0})
  adapter = reparam.init(jax.random.key(1), cfg, base)
  assert set(adapter) == {"embed", "dense", "query", "out"}
  assert adapter["dense"]["kernel"]["a"].shape == (8, 4)
  assert adapter["query"]["kernel"]["a"].shape == (8, 2) and adapter["query"]["kernel"]["b"].shape == (2, 8)
  assert adapter["out"]["kernel"]["a"].shape == (8, 2)
  targets = {t.path: t for t in select_targets(cfg, base)}
  assert targets["dense/kernel"].scaling == 12.0 / 4 and targets["query/kernel"].scaling == 8.0 / 2


def test_zero_init_is_identity_on_outputs(base):
  model, x = tm.TinyTransformer(), tm.tokens()
  adapter = reparam.init(jax.random.key(1), _cfg(), base)
  np.testing.assert_array_equal(
      model.apply({"params": reparam.apply(base, adapter, _cfg())}, x), model.apply({"params": base}, x)
  )


def test_apply_matches_closed_form_and_merge_unmerge(base):
  cfg = _cfg(init="random", rank=3, alpha=6.0)
  adapter = reparam.init(jax.random.key(2), cfg, base)
  adapted = reparam.apply(base, adapter, cfg)
  for name, leaf in [("dense", "kernel"), ("query", "kernel"), ("out", "kernel"), ("embed", "embedding")]:
    ab = adapter[name][leaf]
    np.testing.assert_allclose(
        adapted[name][leaf], _np_lora(base[name][leaf], ab["a"], ab["b"], 2.0), rtol=1e-6, atol=1e-6
    )
  np.testing.assert_array_equal(adapted["dense"]["bias"], base["dense"]["bias"])
  merged = reparam.merge(base, adapter, cfg)
  jax.tree.map(np.testing.assert_array_equal, merged, adapted)
  back = reparam.unmerge(merged, adapter, cfg)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, base)


def test_apply_rejects_mismatched_adapter(base):
  cfg = _cfg()
  adapter = reparam.init(jax.random.key(1), cfg, base)
  del adapter["dense"]
  adapter["extra"] = {"kernel": {"a": jnp.zeros((1, 1))}}
  with pytest.raises(ValueError, match=r"missing adapters for: \['dense/kernel'\][\s\S]*unexpected.*extra/kernel"):
    reparam.apply(base, adapter, cfg)


def test_apply_many_sums_and_unmerge_many_restores(base):
  c1 = _cfg(targets=r"(dense|query)/kernel", init="random", rank=2)
  c2 = _cfg(targets=r"dense/kernel", init="random", rank=3, alpha=1.5, use_rslora=True)
  a1, a2 = reparam.init(jax.random.key(3), c1, base), reparam.init(jax.random.key(4), c2, base)
  out = reparam.apply_many(base, [(c1, a1), (c2, a2)])
  d1, d2 = a1["dense"]["kernel"], a2["dense"]["kernel"]
  expect = _np_lora(_np_lora(base["dense"]["kernel"], d1["a"], d1["b"], 4.0), d2["a"], d2["b"], 1.5 / np.sqrt(3))
  np.testing.assert_allclose(out["dense"]["kernel"], expect, rtol=1e-6, atol=1e-6)
  back = reparam.unmerge_many(out, [(c1, a1), (c2, a2)])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, base)


class _NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)])

  def __call__(self, x):
    return self.layers[1](jnp.tanh(self.layers[0](x)))


def test_nnx_state():
  graphdef, state = nnx.split(_NnxMLP(nnx.Rngs(0)))
  cfg = AdapterConfig(targets=r"layers/1/kernel", init="random", rank=2, alpha=3.0)
  adapter = reparam.init(jax.random.key(5), cfg, state)
  assert set(adapter["layers"]["1"]["kernel"]) == {"a", "b"}
  x = jnp.linspace(-1, 1, 8).reshape(2, 4)
  y = nnx.merge(graphdef, reparam.apply(state, adapter, cfg))(x)
  w0, b0 = np.asarray(state["layers"][0]["kernel"][...]), np.asarray(state["layers"][0]["bias"][...])
  w1, b1 = np.asarray(state["layers"][1]["kernel"][...]), np.asarray(state["layers"][1]["bias"][...])
  ab = adapter["layers"]["1"]["kernel"]
  expect = np.tanh(np.asarray(x) @ w0 + b0) @ _np_lora(w1, ab["a"], ab["b"], 1.5) + b1
  np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-6)


def test_stacked_layers():
  model, x = tm.ScannedMLP(), jnp.ones((2, tm.WIDTH))
  base = tm.init_params(model, x)
  assert base["layers"]["dense"]["kernel"].shape == (3, 8, 8)
  with pytest.raises(ValueError, match="has 3 axes"):
    reparam.init(jax.random.key(0), AdapterConfig(targets=".*kernel"), base)
  cfg = AdapterConfig(targets=".*kernel", stacked_axes={".*": 1}, rank=2, init="random")
  adapter = reparam.init(jax.random.key(0), cfg, base)
  a, b = adapter["layers"]["dense"]["kernel"]["a"], adapter["layers"]["dense"]["kernel"]["b"]
  assert a.shape == (3, 8, 2) and b.shape == (3, 2, 8)
  assert not np.allclose(a[0], a[1])  # independent draws per layer
  out = reparam.apply(base, adapter, cfg)
  w = base["layers"]["dense"]["kernel"]
  for layer in range(3):
    np.testing.assert_allclose(
        out["layers"]["dense"]["kernel"][layer], _np_lora(w[layer], a[layer], b[layer], 4.0), rtol=1e-6, atol=1e-6
    )
  y = model.apply({"params": out}, x)
  h = np.asarray(x, np.float64)
  for layer in range(3):
    kernel, bias = out["layers"]["dense"]["kernel"][layer], base["layers"]["dense"]["bias"][layer]
    h = np.tanh(h @ np.asarray(kernel) + np.asarray(bias))
  np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)


def test_bfloat16_base_float32_math():
  base = tm.init_params(tm.TinyTransformer(dtype=jnp.bfloat16), tm.tokens())
  cfg = _cfg(targets="dense/kernel", init="random", rank=2)
  adapter = reparam.init(jax.random.key(6), cfg, base)
  assert adapter["dense"]["kernel"]["a"].dtype == jnp.float32
  out = reparam.merge(base, adapter, cfg)
  assert out["dense"]["kernel"].dtype == jnp.bfloat16
  ab = adapter["dense"]["kernel"]
  expect = _np_lora(np.asarray(base["dense"]["kernel"], np.float32), ab["a"], ab["b"], 4.0)
  np.testing.assert_array_equal(
      np.asarray(out["dense"]["kernel"], np.float32),
      np.asarray(jnp.asarray(expect, jnp.float32).astype(jnp.bfloat16), np.float32),
  )
  back = reparam.unmerge(out, adapter, cfg)
  # one bfloat16 rounding in the merge: within 1 ulp (2^-8 relative) of |W'|
  err = np.abs(np.asarray(back["dense"]["kernel"], np.float32) - np.asarray(base["dense"]["kernel"], np.float32))
  assert np.all(err <= 2.0**-7 * np.abs(np.asarray(out["dense"]["kernel"], np.float32)) + 1e-6)


def test_jit_grad_and_pmap(base):
  cfg = _cfg(init="random", rank=2)
  adapter = reparam.init(jax.random.key(7), cfg, base)
  eager = reparam.apply(base, adapter, cfg)
  jitted = jax.jit(reparam.apply, static_argnums=2)(base, adapter, cfg)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), jitted, eager)
  n = jax.local_device_count()
  assert n == 8
  rep = lambda t: jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), t)
  pmapped = jax.pmap(lambda p, a: reparam.apply(p, a, cfg))(rep(base), rep(adapter))
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, np.broadcast_to(y, x.shape), rtol=1e-6, atol=1e-6), pmapped, eager
  )
  # gradient wrt b of sum(W') is s * a^T 1 (closed form)
  g = jax.grad(lambda a: jnp.sum(reparam.apply(base, a, cfg)["dense"]["kernel"]))(adapter)
  a = np.asarray(adapter["dense"]["kernel"]["a"])
  np.testing.assert_allclose(
      g["dense"]["kernel"]["b"], 4.0 * a.sum(0)[:, None] * np.ones((1, 8)), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(g["query"]["kernel"]["a"], 0.0)  # query/kernel not in the loss


def test_registering_a_method_from_the_docstring_example(base):
  @register_method("test_scaled_identity")
  class ScaledIdentity(AdapterMethod):
    option_defaults = {"c_init": 0.5}

    def init(self, rng, kernel, target: Target):
      return {"c": jnp.full((), target.option("c_init"), jnp.float32)}

    def delta(self, leaves, target):
      return leaves["c"] * jnp.eye(target.matrix_shape[0], dtype=jnp.float32)

  cfg = dataclasses.replace(_cfg(targets="dense/kernel", method="test_scaled_identity"), options={"c_init": 2.0})
  adapter = reparam.init(jax.random.key(0), cfg, base)
  out = reparam.apply(base, adapter, cfg)
  np.testing.assert_allclose(
      out["dense"]["kernel"], np.asarray(base["dense"]["kernel"]) + 2.0 * np.eye(8), rtol=1e-6
  )
  with pytest.raises(ValueError, match="already registered"):
    register_method("lora")(ScaledIdentity)


def test_raw_uint32_keys_equal_typed_keys(base):
  cfg = _cfg(targets="dense/kernel")
  raw = reparam.init(jax.random.PRNGKey(3), cfg, base)
  typed = reparam.init(jax.random.key(3), cfg, base)
  jax.tree.map(np.testing.assert_array_equal, raw, typed)
  other = reparam.init(jax.random.key(4), cfg, base)
  assert not np.allclose(raw["dense"]["kernel"]["a"], other["dense"]["kernel"]["a"])


def test_bias_hook_on_dense_general_nnx_and_stacked_layers(base):
  """A method with ``adapts_bias`` ((IA)^3 output mode: bias' = l * bias) updates the sibling bias everywhere."""
  cfg = _cfg(targets=r"(embed/embedding|query/kernel|out/kernel)", method="ia3", init="random")
  targets = {t.path: t for t in select_targets(cfg, base)}
  assert {p: t.bias_path for p, t in targets.items()} == {
      "embed/embedding": None,
      "query/kernel": "query/bias",
      "out/kernel": "out/bias",
  }
  adapter = reparam.init(jax.random.key(0), cfg, base)
  applied = reparam.apply(base, adapter, cfg)
  for name in ("query", "out"):
    l = np.asarray(adapter[name]["kernel"]["l"])
    np.testing.assert_allclose(
        applied[name]["bias"],
        (l * np.asarray(base[name]["bias"]).reshape(-1)).reshape(base[name]["bias"].shape),
        rtol=1e-6,
    )
  np.testing.assert_allclose(reparam.unmerge(applied, adapter, cfg)["out"]["bias"], base["out"]["bias"], rtol=1e-5)

  graphdef, state = nnx.split(_NnxMLP(nnx.Rngs(0)))
  nnx_cfg = AdapterConfig(targets=r"layers/1/kernel", method="ia3", init="random")
  adapter = reparam.init(jax.random.key(5), nnx_cfg, state)
  x = jnp.linspace(-1, 1, 8).reshape(2, 4)
  hidden = np.asarray(nnx.merge(graphdef, state).layers[0](x))
  w1, b1 = np.asarray(state["layers"][1]["kernel"][...]), np.asarray(state["layers"][1]["bias"][...])
  expect = np.asarray(adapter["layers"]["1"]["kernel"]["l"]) * (np.tanh(hidden) @ w1 + b1)
  np.testing.assert_allclose(
      nnx.merge(graphdef, reparam.apply(state, adapter, nnx_cfg))(x), expect, rtol=1e-5, atol=1e-6
  )

  stacked = tm.init_params(tm.ScannedMLP(), jnp.ones((2, tm.WIDTH)))
  st_cfg = AdapterConfig(targets="layers/dense/kernel", method="ia3", init="random", stacked_axes={"layers/.*": 1})
  adapter = reparam.init(jax.random.key(1), st_cfg, stacked)
  l = np.asarray(adapter["layers"]["dense"]["kernel"]["l"])
  assert l.shape == (3, tm.WIDTH)
  np.testing.assert_allclose(
      reparam.apply(stacked, adapter, st_cfg)["layers"]["dense"]["bias"],
      l * np.asarray(stacked["layers"]["dense"]["bias"]),
      rtol=1e-6,
  )


def test_bias_that_is_also_a_target_is_an_error(base):
  @register_method("test_bias_and_vector_scale")
  class Scale(AdapterMethod):
    adapts_bias = True

    def init(self, rng, kernel, target):
      return {"l": jnp.ones((kernel.shape[1],), jnp.float32)}

    def apply(self, kernel, leaves, target):
      return kernel * leaves["l"]

  with pytest.raises(ValueError, match="'dense/bias' is both a target and the bias"):
    select_targets(AdapterConfig(targets="dense/(kernel|bias)", method="test_bias_and_vector_scale"), base)
