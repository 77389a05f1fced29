"""LoRA / rsLoRA / PiSSA tests against closed forms in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig


def _dense(d_in, d_out, seed=0, name="kernel"):
  return {"layer": {name: jax.random.normal(jax.random.key(seed), (d_in, d_out), jnp.float32)}}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_update_is_closed_form(use_rslora):
  base = _dense(6, 5)
  cfg = AdapterConfig(targets="layer/kernel", rank=3, alpha=7.0, use_rslora=use_rslora, init="random")
  adapter = reparam.init(jax.random.key(1), cfg, base)
  a, b = (np.asarray(adapter["layer"]["kernel"][k], np.float64) for k in "ab")
  scale = 7.0 / (np.sqrt(3) if use_rslora else 3)
  expect = np.asarray(base["layer"]["kernel"], np.float64) + scale * a @ b
  np.testing.assert_allclose(reparam.apply(base, adapter, cfg)["layer"]["kernel"], expect, rtol=1e-6, atol=1e-6)
  assert np.linalg.matrix_rank(expect - np.asarray(base["layer"]["kernel"])) == 3


def test_init_distributions():
  d_in, d_out, r = 1024, 64, 32
  base = {**_dense(d_in, d_out), "emb": {"embedding": jnp.zeros((d_in, d_out))}}
  default = reparam.init(jax.random.key(2), AdapterConfig(targets=".*", rank=r, init="default"), base)
  a, b = np.asarray(default["layer"]["kernel"]["a"]), np.asarray(default["layer"]["kernel"]["b"])
  bound = 1 / np.sqrt(d_in)  # torch kaiming_uniform_(a=sqrt(5)) bound
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.02)
  np.testing.assert_array_equal(b, 0.0)
  # embeddings: PEFT's reversed init, a = 0 and b ~ N(0, 1)
  np.testing.assert_array_equal(default["emb"]["embedding"]["a"], 0.0)
  np.testing.assert_allclose(np.asarray(default["emb"]["embedding"]["b"]).std(), 1.0, rtol=0.05)

  gauss = reparam.init(jax.random.key(3), AdapterConfig(targets="layer/kernel", rank=r, init="gaussian"), base)
  np.testing.assert_allclose(np.asarray(gauss["layer"]["kernel"]["a"]).std(), 1 / r, rtol=0.02)
  np.testing.assert_array_equal(gauss["layer"]["kernel"]["b"], 0.0)

  rand = reparam.init(jax.random.key(4), AdapterConfig(targets="layer/kernel", rank=r, init="random"), base)
  b = np.asarray(rand["layer"]["kernel"]["b"])
  assert np.abs(b).max() <= 1 / np.sqrt(r)
  np.testing.assert_allclose(b.std(), 1 / np.sqrt(3 * r), rtol=0.03)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_6"])
def test_pissa_takes_principal_part_and_leaves_residual(init):
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  v, _ = np.linalg.qr(rng.normal(size=(10, 10)))
  s = np.array([9.0, 7.0, 5.0, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02])
  w = (u[:, :10] * s) @ v.T
  base = {"layer": {"kernel": jnp.asarray(w, jnp.float32)}}
  cfg = AdapterConfig(targets="layer/kernel", rank=3, alpha=6.0, init=init)
  with pytest.raises(ValueError, match="init_with_base"):
    reparam.init(jax.random.key(0), cfg, base)
  residual, adapter = reparam.init_with_base(jax.random.key(0), cfg, base)
  a, b = (np.asarray(adapter["layer"]["kernel"][k], np.float64) for k in "ab")
  top = (u[:, :3] * s[:3]) @ v[:, :3].T
  np.testing.assert_allclose(2.0 * a @ b, top, atol=1e-4)
  np.testing.assert_allclose(residual["layer"]["kernel"], w - top, atol=1e-4)
  # PEFT's split: a and b carry sqrt(S_r / s) each
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(s[:3] / 2.0), rtol=1e-4)
  np.testing.assert_allclose(reparam.apply(residual, adapter, cfg)["layer"]["kernel"], w, atol=1e-5)


def test_rank_above_the_layers_smaller_dimension_is_refused():
  base = _dense(4, 3)
  with pytest.raises(ValueError, match=r"rank 4 exceeds the layer's smaller dimension min\(d_in, d_out\) = 3"):
    reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", rank=4), base)
  reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", rank=3), base)


def test_pissa_rank_and_init_errors():
  base = _dense(4, 3)
  with pytest.raises(
      ValueError, match=r"layer/kernel: rank 4 exceeds the layer's smaller dimension min\(d_in, d_out\) = 3"
  ):
    reparam.init_with_base(jax.random.key(0), AdapterConfig(targets="layer/kernel", rank=4, init="pissa"), base)
  with pytest.raises(ValueError, match="unknown init 'olora'"):
    reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", init="olora"), base)
