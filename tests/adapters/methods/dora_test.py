"""DoRA tests against closed forms in numpy (value and the detached-norm gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig

CFG = AdapterConfig(targets="layer/kernel", method="dora", rank=2, alpha=3.0, init="random")
S = 1.5


@pytest.fixture(scope="module")
def setup():
  base = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (6, 5), jnp.float32)}}
  adapter = reparam.init(jax.random.key(1), CFG, base)
  adapter["layer"]["kernel"]["m"] = adapter["layer"]["kernel"]["m"] * jnp.linspace(0.5, 2.0, 5)
  return base, adapter


def _np(base, adapter):
  w = np.asarray(base["layer"]["kernel"], np.float64)
  a, b, m = (np.asarray(adapter["layer"]["kernel"][k], np.float64) for k in "abm")
  v = w + S * a @ b
  return w, a, b, m, v, np.linalg.norm(v, axis=0)


def test_init_magnitude_is_column_norm():
  base = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (6, 5), jnp.float32)}}
  cfg = AdapterConfig(targets="layer/kernel", method="dora", rank=2)
  adapter = reparam.init(jax.random.key(1), cfg, base)
  np.testing.assert_allclose(
      adapter["layer"]["kernel"]["m"], np.linalg.norm(base["layer"]["kernel"], axis=0), rtol=1e-6
  )
  np.testing.assert_allclose(
      reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"], rtol=1e-6, atol=1e-6
  )


def test_apply_is_closed_form(setup):
  base, adapter = setup
  _, _, _, m, v, norm = _np(base, adapter)
  np.testing.assert_allclose(
      reparam.apply(base, adapter, CFG)["layer"]["kernel"], v * (m / norm), rtol=1e-5, atol=1e-6
  )
  merged = reparam.merge(base, adapter, CFG)["layer"]["kernel"]
  np.testing.assert_allclose(np.linalg.norm(merged, axis=0), np.abs(m), rtol=1e-5)


def test_gradient_treats_norm_as_constant(setup):
  base, adapter = setup
  c = np.asarray(jax.random.normal(jax.random.key(2), (6, 5)), np.float64)
  g = jax.grad(lambda ad: jnp.sum(reparam.apply(base, ad, CFG)["layer"]["kernel"] * c))(adapter)["layer"]["kernel"]
  _, a, _, m, v, norm = _np(base, adapter)
  dv = c * (m / norm)  # dL/dV with the norm held constant
  np.testing.assert_allclose(g["m"], (v * c).sum(0) / norm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g["b"], S * a.T @ dv, rtol=1e-5, atol=1e-6)


def test_unmerge_and_pissa_are_refused(setup):
  base, adapter = setup
  with pytest.raises(ValueError, match="DoRA cannot be unmerged"):
    reparam.unmerge(base, adapter, CFG)
  with pytest.raises(ValueError, match="DoRA cannot use a PiSSA init"):
    reparam.init_with_base(
        jax.random.key(0), AdapterConfig(targets="layer/kernel", method="dora", init="pissa"), base
    )
