"""Registry-driven conformance suite: every built-in adapter method passes the same checks.

For each method registered from ``jaxpeft.adapters.methods`` (a method without a case here fails the suite):
init shapes and dtypes, jit and grad through ``application.applied``, merge == apply with non-zero adapter
leaves, unmerge (or a clear refusal), activation path == weight path where the method has both, save/load,
and the refusal of a layer kind it does not support. Numbers of each method are checked against the
authors' code in its own test file; this suite checks the contract they all share.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxpeft.adapters import application, factored, mixed_batch, reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, get_method, list_methods
from jaxpeft.adapters.module_hooks import ModuleHookMethod
from tests.adapters import module_hook_checks as mh
from tests.adapters import tiny_models as tm

LINEAR = r"block_0/(q|v)/kernel"  # Dense 8 x 8 kernels of the tiny ViT
CONV = {"conv/kernel": 3}


@dataclasses.dataclass(frozen=True)
class Case:
  """``config`` on ``model`` ('vit', 'text' or 'conv'); ``unsupported``: targets the method must refuse."""

  config: dict
  model: str = "vit"
  unsupported: str | None = r"block_0/q/bias"


CASES = {
    "lora": Case({"targets": LINEAR, "rank": 2, "alpha": 3.0}),
    "dora": Case({"targets": LINEAR, "rank": 2}),
    "loha": Case({"targets": LINEAR, "rank": 2}),
    "lokr": Case({"targets": LINEAR, "rank": 1}),
    "hydra": Case({"targets": LINEAR, "rank": 2}),
    "nola": Case({"targets": LINEAR, "rank": 2, "options": {"num_basis_a": 3, "num_basis_b": 3}}),
    "randlora": Case({"targets": LINEAR, "rank": 2}),
    "vera": Case({"targets": LINEAR, "rank": 4}),
    "salt": Case({"targets": LINEAR, "rank": 2, "options": {"ratio": 0.5}}),
    "pela": Case({"targets": LINEAR, "rank": 4}),
    "svd_ft": Case({"targets": LINEAR}),
    "sara": Case({"targets": LINEAR, "options": {"threshold": 0.3}}, unsupported=None),
    "sora": Case({"targets": LINEAR, "rank": 2}),
    "allora": Case({"targets": LINEAR, "rank": 2, "options": {"eta": 4.0}}),
    "corda": Case({"targets": LINEAR, "rank": 2}),
    "tlora": Case({"targets": LINEAR, "rank": 2}),
    "ia3": Case({"targets": LINEAR}),
    "bitfit": Case({"targets": r"block_0/q/bias"}, unsupported=r"block_0/q/kernel"),
    "conv_lora": Case({"targets": "conv/kernel", "rank": 2, "fan_in_axes": CONV}, "conv", "conv/bias"),
    "conv_dora": Case({"targets": "conv/kernel", "rank": 2, "fan_in_axes": CONV}, "conv", "conv/bias"),
    "cp_lora": Case({"targets": "conv/kernel", "rank": 2, "fan_in_axes": CONV}, "conv", "conv/bias"),
    "houlsby": Case({"targets": r"block_0/out/kernel", "rank": 3}),
    "adaptformer": Case({"targets": r"block_0/mlp/fc1/kernel", "rank": 3}),
    "prompt_tuning": Case({"targets": "embed/embedding", "rank": 2}, model="text", unsupported="head/kernel"),
    "vpt": Case(
        {"targets": r"block_\d+/ln1/scale", "rank": 2, "options": {"patch_size": 2}},
        unsupported=r"block_0/q/kernel",
    ),
    "mixed_batch": Case({"targets": LINEAR, "rank": 2}),  # built from LoRA adapters: see its own check
}


@pytest.fixture(autouse=True, scope="module")
def _quick_compiles():
  """XLA without its expensive passes while this file runs (compiling, not running, is what these tiny checks
  spend their time on; the numbers are the same to the tolerances used here)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _builtin_methods() -> list[str]:
  return [
      name for name in list_methods() if type(get_method(name)).__module__.startswith("jaxpeft.adapters.methods.")
  ]


def test_every_registered_method_has_a_conformance_case():
  missing, stale = sorted(set(_builtin_methods()) - set(CASES)), sorted(set(CASES) - set(_builtin_methods()))
  assert not missing and not stale, f"methods without a conformance case: {missing}; cases of no method: {stale}"


def _model(kind):
  if kind == "conv":
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 3))
    model = tm.TinyConv()
    return model, x, model.init(jax.random.key(0), x)["params"]
  return mh.model_and_input(text=kind == "text")


def _forward(model, params, adapter, config, x, mode="reparam"):
  with application.applied(params, adapter, config, mode=mode) as model_params:
    return model.apply({"params": model_params}, x)


def _nonzero(adapter, config):
  """Every trained leaf moved off its init (so zero-initialised factors cannot hide a wrong merge)."""
  frozen = get_method(config.method).frozen_leaves
  rng = np.random.default_rng(5)
  flat = traverse_util.flatten_dict(adapter)
  return traverse_util.unflatten_dict(
      {
          k: v if k[-1] in frozen else jnp.asarray(np.asarray(v) + 0.05 * rng.normal(size=v.shape), v.dtype)
          for k, v in flat.items()
      }
  )


def _close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"mixed_batch"}))
def test_method_conforms(name, tmp_path):
  case = CASES[name]
  method = get_method(name)
  model, x, params = _model(case.model)
  config = AdapterConfig(method=name, **case.config)
  base, adapter = reparam.init_with_base(jax.random.key(1), config, params)

  # init: one entry per target, float32 trained leaves of finite values.
  flat = traverse_util.flatten_dict(adapter, sep="/")
  targets = {k.rpartition("/")[0] for k in flat}
  assert targets and all(np.isfinite(v).all() for v in flat.values()), name
  for key, leaf in flat.items():
    if key.rpartition("/")[2] not in method.frozen_leaves:
      assert leaf.dtype == jnp.float32, (key, leaf.dtype)

  # jit (compiled == eager) and grad, of sum(out^2): one compiled function gives both (one compile, not two).
  adapter = _nonzero(adapter, config)
  out = _forward(model, base, adapter, config, x)

  @jax.jit
  def compiled_out_and_grads(a, b, x):
    out, vjp = jax.vjp(lambda a: _forward(model, b, a, config, x), a)
    return out, vjp(2 * out)[0]  # d sum(out^2) / d a

  compiled_out, grads = compiled_out_and_grads(adapter, base, x)
  _close(compiled_out, out)
  grads = {k: np.asarray(g) for k, g in traverse_util.flatten_dict(grads, sep="/").items()}
  trained = {k: g for k, g in grads.items() if k.rpartition("/")[2] not in method.frozen_leaves}
  assert all(np.isfinite(g).all() for g in grads.values())
  assert any(np.abs(g).max() > 0 for g in trained.values()), f"{name}: no trained leaf has a gradient"
  for key, g in grads.items():
    if key.rpartition("/")[2] in method.frozen_leaves:
      assert not np.any(g), f"{key}: a frozen leaf got a gradient"

  if isinstance(method, ModuleHookMethod):
    with pytest.raises(ValueError, match="adds modules"):
      reparam.merge(base, adapter, config)
  else:
    merged = reparam.merge(base, adapter, config)
    _close(model.apply({"params": merged}, x), out)
    try:
      restored = reparam.unmerge(merged, adapter, config)
    except ValueError as e:
      assert name in str(e).lower() or "cannot" in str(e) or "unmerge" in str(e), str(e)
    else:
      _close(restored, base, atol=1e-4)
    if type(method).branch is not AdapterMethod.branch and case.model != "conv":
      _close(_forward(model, base, adapter, config, x, mode="factored"), out)

  save_adapter(tmp_path / "adapter.safetensors", adapter, config)
  loaded, loaded_config = load_adapter(tmp_path / "adapter.safetensors", base)
  assert loaded_config == config
  _close(loaded, adapter, atol=0)

  if case.unsupported is not None:
    with pytest.raises(ValueError):
      reparam.init(jax.random.key(1), dataclasses.replace(config, targets=case.unsupported), params)


def test_mixed_batch_conforms():
  model, x, params = _model("vit")
  config = AdapterConfig(targets=LINEAR, rank=2, alpha=3.0, init="random")
  with pytest.raises(ValueError, match="mixed_batch.stack"):
    reparam.init(jax.random.key(0), dataclasses.replace(config, method="mixed_batch"), params)
  loras = [_nonzero(reparam.init(jax.random.key(i), config, params), config) for i in range(2)]
  stacked, stacked_config = mixed_batch.stack(params, [(config, a) for a in loras])
  with pytest.raises(ValueError, match="no single merged weight"):
    reparam.merge(params, stacked, stacked_config)
  index = jnp.array([1, -1])
  with mixed_batch.intercept(params, stacked, stacked_config, index):
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  _close(out[0], _forward(model, params, loras[1], config, x)[0])
  _close(out[1], model.apply({"params": params}, x)[1])
  reference = _forward(model, params, loras[0], config, x)
  with factored.intercept(params, loras[0], config):
    _close(model.apply({"params": params}, x), reference)
