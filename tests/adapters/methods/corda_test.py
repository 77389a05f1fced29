"""CorDA tests: parity with Hugging Face PEFT (covariances, factors, residual base, outputs), closed forms, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

from jaxpeft.adapters import factored, reparam
from jaxpeft.adapters.methods import corda
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from tests.adapters import method_checks as mc

D_IN, D_OUT, R, ALPHA, TOKENS = 6, 5, 2, 3.0, 10


class _Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, name="layer")(x)


def _batches():
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(D_IN, D_IN)) * np.linspace(0.1, 2.0, D_IN)  # anisotropic inputs
  return [(rng.normal(size=(1, TOKENS, D_IN)) @ mix + 0.5).astype(np.float32) for _ in range(3)]


def _config(mode):
  return AdapterConfig(targets="layer/kernel", method="corda", rank=R, alpha=ALPHA, options={"mode": mode})


def _peft(mode, batches):
  torch.manual_seed(0)
  model = mc.Wrap(torch.nn.Linear(D_IN, D_OUT))
  params = {
      "layer": {"kernel": jnp.asarray(mc.t2n(model.layer.weight).T), "bias": jnp.asarray(mc.t2n(model.layer.bias))}
  }
  config = peft.LoraConfig(
      r=R,
      lora_alpha=ALPHA,
      target_modules=["layer"],
      init_lora_weights="corda",
      corda_config=CordaConfig(corda_method=mode, prune_temporary_fields=False),
  )

  def run_model():
    for batch in batches:
      model(torch.from_numpy(batch))

  preprocess_corda(model, config, run_model=run_model)
  covariance = mc.t2n(model.layer.covariance_matrix)
  peft_model = peft.get_peft_model(model, config)
  peft_model.eval()
  return peft_model, peft_model.base_model.model.layer, params, covariance


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_matches_peft(mode):
  batches = _batches()
  peft_model, layer, params, peft_cov = _peft(mode, batches)
  cfg = _config(mode)
  covs = corda.collect_covariances(lambda p, x: _Model().apply({"params": p}, x), params, batches, cfg)
  np.testing.assert_allclose(covs["layer/kernel"], peft_cov, rtol=1e-5, atol=1e-6)
  residual, adapter = corda.init_with_base(cfg, params, covs)
  a, b = adapter["layer"]["kernel"]["a"], adapter["layer"]["kernel"]["b"]
  peft_a, peft_b = mc.t2n(layer.lora_A["default"].weight).T, mc.t2n(layer.lora_B["default"].weight).T
  # singular vector pairs are defined up to a joint sign: compare each rank-one component a_i b_i
  for i in range(R):
    np.testing.assert_allclose(np.outer(a[:, i], b[i]), np.outer(peft_a[:, i], peft_b[i]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.abs(a[:, i]), np.abs(peft_a[:, i]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(residual["layer"]["kernel"], mc.t2n(layer.base_layer.weight).T, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(residual["layer"]["bias"], params["layer"]["bias"])

  # same weights into both (PEFT's factors, moved away from the init), outputs equal, also after merging
  with torch.no_grad():
    layer.lora_B["default"].weight.mul_(torch.linspace(0.5, 1.5, D_OUT)[:, None])
  ours = {
      "layer": {"kernel": {"a": jnp.asarray(peft_a), "b": jnp.asarray(mc.t2n(layer.lora_B["default"].weight).T)}}
  }
  base = {"layer": {"kernel": jnp.asarray(mc.t2n(layer.base_layer.weight).T), "bias": params["layer"]["bias"]}}
  x = np.random.default_rng(1).normal(size=(4, D_IN)).astype(np.float32)
  expect = mc.t2n(peft_model(torch.from_numpy(x)))
  np.testing.assert_allclose(
      _Model().apply({"params": reparam.apply(base, ours, cfg)}, x), expect, rtol=1e-5, atol=1e-5
  )
  with factored.intercept(base, ours, cfg):
    np.testing.assert_allclose(_Model().apply({"params": base}, x), expect, rtol=1e-5, atol=1e-5)
  peft_model.merge_adapter()
  np.testing.assert_allclose(
      reparam.merge(base, ours, cfg)["layer"]["kernel"], mc.t2n(layer.base_layer.weight).T, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_closed_form_and_exact_reconstruction(mode):
  """``s a b`` is the top / bottom ``r`` part of ``W = U Σ (Vᵀ C⁻¹)`` (PyTorch orientation), residual + s a b = W."""
  rng = np.random.default_rng(3)
  w = rng.normal(size=(D_OUT, D_IN))
  x = rng.normal(size=(40, D_IN)) @ rng.normal(size=(D_IN, D_IN))
  cov = x.T @ x / 40
  params = {"layer": {"kernel": jnp.asarray(w.T, jnp.float32)}}
  residual, adapter = corda.init_with_base(_config(mode), params, {"layer/kernel": jnp.asarray(cov, jnp.float32)})
  damped = cov + 0.01 * np.mean(np.diag(cov)) * np.eye(D_IN)  # well conditioned: the first damping suffices
  u, s, vt = np.linalg.svd(w @ damped, full_matrices=False)
  right = vt @ np.linalg.inv(damped)
  keep = slice(None, R) if mode == "ipm" else slice(-R, None)
  part = (u[:, keep] * s[keep]) @ right[keep]
  lv = adapter["layer"]["kernel"]
  np.testing.assert_allclose(ALPHA / R * np.asarray(lv["a"] @ lv["b"]), part.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      np.asarray(residual["layer"]["kernel"]) + ALPHA / R * np.asarray(lv["a"] @ lv["b"]), w.T, atol=1e-5
  )
  np.testing.assert_allclose(reparam.apply(residual, adapter, _config(mode))["layer"]["kernel"], w.T, atol=1e-5)


def test_damping_of_a_singular_covariance():
  cov = np.diag([4.0, 2.0, 0.0, 0.0]).astype(np.float32)  # singular: the damping makes it invertible
  damped, inverse = corda.damped_inverse(jnp.asarray(cov))
  expect = cov + 0.01 * np.mean(np.diag(cov)) * np.eye(4)  # PEFT's first damping (float32 inverse is accurate)
  np.testing.assert_allclose(damped, expect, rtol=1e-6)
  np.testing.assert_allclose(inverse, np.linalg.inv(expect), rtol=1e-5)


def test_identity_covariance_is_pissa():
  params = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT), jnp.float32)}}
  _, adapter = reparam.init_with_base(jax.random.key(0), _config("ipm"), params)
  _, pissa = reparam.init_with_base(
      jax.random.key(0), AdapterConfig(targets="layer/kernel", rank=R, alpha=ALPHA, init="pissa"), params
  )
  c, p = adapter["layer"]["kernel"], pissa["layer"]["kernel"]
  np.testing.assert_allclose(c["a"] @ c["b"], p["a"] @ p["b"], rtol=1e-4, atol=1e-5)


def test_collect_covariances_on_two_layers_param_count_and_training(tmp_path):
  class Two(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(D_IN, name="l1")(x))
      return nn.Dense(D_OUT, name="l2")(h)

  batches = [b[0] for b in _batches()]  # (tokens, d_in) batches
  params = Two().init(jax.random.key(0), batches[0])["params"]
  cfg = AdapterConfig(targets="l[12]/kernel", method="corda", rank=R, alpha=ALPHA, options={"mode": "kpm"})
  covs = corda.collect_covariances(lambda p, x: Two().apply({"params": p}, x), params, batches, cfg)

  def expected(inputs):
    return np.mean([(i / abs(i.max())).T @ (i / abs(i.max())) for i in inputs], axis=0)

  hidden = [np.tanh(np.asarray(nn.Dense(D_IN).apply({"params": params["l1"]}, b))) for b in batches]
  np.testing.assert_allclose(covs["l1/kernel"], expected(batches), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(covs["l2/kernel"], expected(hidden), rtol=1e-5, atol=1e-5)

  residual, adapter = corda.init_with_base(cfg, params, covs)
  assert param_count(adapter) == R * (D_IN + D_IN) + R * (D_IN + D_OUT)
  x = jnp.asarray(np.concatenate(batches), jnp.float32)
  y = jnp.cos(x[:, :D_OUT])
  adapter, losses = mc.train(
      adapter,
      residual,
      cfg,
      optax.adam(0.02),
      x,
      y,
      loss_fn=lambda p, x, y: jnp.mean((Two().apply({"params": p}, x) - y) ** 2),
  )
  assert losses[-1] < 0.5 * losses[0]
  mc.check_checkpoint_round_trip(tmp_path, residual, adapter, cfg, filename="corda_orbax")


def test_errors():
  params = {"layer": {"kernel": jnp.ones((D_IN, D_OUT)), "bias": jnp.zeros((D_OUT,))}}
  with pytest.raises(ValueError, match=r"missing: \['layer/kernel'\]"):
    corda.init_with_base(_config("ipm"), params, {})
  with pytest.raises(ValueError, match=r"covariance must have shape \(6, 6\)"):
    corda.init_with_base(_config("ipm"), params, {"layer/kernel": jnp.eye(5)})
  with pytest.raises(ValueError, match="mode must be one of"):
    corda.init_with_base(_config("both"), params, {"layer/kernel": jnp.eye(D_IN)})
  with pytest.raises(ValueError, match="needs AdapterConfig\\(method='corda'\\)"):
    corda.init_with_base(AdapterConfig(targets="layer/kernel"), params, {"layer/kernel": jnp.eye(D_IN)})
  with pytest.raises(ValueError, match="init_with_base"):
    reparam.init(jax.random.key(0), _config("ipm"), params)
