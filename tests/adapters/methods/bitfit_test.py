"""BitFit: bias offsets in closed form (value and gradient), merge/unmerge, training and checkpointing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import method_checks as mc
from tests.adapters import tiny_models as tm

CFG = AdapterConfig(targets="layer/bias", method="bitfit")


def _with_offset(adapter):
  return jax.tree_util.tree_map(lambda v: v + jnp.linspace(-1.0, 1.0, v.size).reshape(v.shape), adapter)


def test_closed_form_identity_merge_unmerge_and_count():
  base = mc.dense_params(6, 5)
  adapter = reparam.init(jax.random.key(0), CFG, base)
  np.testing.assert_array_equal(adapter["layer"]["bias"]["delta"], 0.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reparam.apply(base, adapter, CFG), base)
  adapter = _with_offset(adapter)
  applied = reparam.apply(base, adapter, CFG)
  np.testing.assert_allclose(
      applied["layer"]["bias"], np.asarray(base["layer"]["bias"]) + np.linspace(-1, 1, 5), rtol=1e-6, atol=1e-7
  )
  np.testing.assert_array_equal(applied["layer"]["kernel"], base["layer"]["kernel"])
  mc.check_merge_unmerge(base, adapter, CFG)
  assert mc.trainable_count(adapter, CFG) == 5  # d_out per bias


def test_gradient_is_the_bias_gradient():
  base = mc.dense_params(6, 5)
  x = np.asarray(jax.random.normal(jax.random.key(1), (8, 6)), np.float64)
  y = np.asarray(jax.random.normal(jax.random.key(2), (8, 5)), np.float64)
  adapter = _with_offset(reparam.init(jax.random.key(0), CFG, base))

  def loss(ad):
    p = reparam.apply(base, ad, CFG)["layer"]
    return jnp.mean((x @ p["kernel"] + p["bias"] - y) ** 2)

  grad = jax.grad(loss)(adapter)["layer"]["bias"]["delta"]
  w, b = (np.asarray(base["layer"][k], np.float64) for k in ("kernel", "bias"))
  residual = x @ w + b + np.linspace(-1, 1, 5) - y
  np.testing.assert_allclose(grad, 2 * residual.sum(0) / residual.size, rtol=1e-5, atol=1e-6)


def test_stacked_and_all_biases_of_a_model():
  base = tm.init_params(tm.ScannedMLP(), jnp.ones((2, tm.WIDTH)))
  cfg = AdapterConfig(targets=r".*/bias", method="bitfit", stacked_axes={r".*": 1})
  adapter = _with_offset(reparam.init(jax.random.key(0), cfg, base))
  assert adapter["layers"]["dense"]["bias"]["delta"].shape == (3, tm.WIDTH)
  np.testing.assert_allclose(
      reparam.apply(base, adapter, cfg)["layers"]["dense"]["bias"],
      np.asarray(base["layers"]["dense"]["bias"]) + np.linspace(-1, 1, 3 * tm.WIDTH).reshape(3, tm.WIDTH),
      rtol=1e-6,
      atol=1e-6,
  )


def test_training_and_checkpoint(tmp_path):
  base = mc.dense_params(6, 5)
  mc.check_training_reduces_loss(CFG, base, lr=0.1, max_ratio=0.9)  # a bias can only fit the mean offset
  mc.check_checkpoint_round_trip(tmp_path, base, _with_offset(reparam.init(jax.random.key(0), CFG, base)), CFG)


def test_kernel_targets_are_refused():
  refusal = (
      r"layer/kernel: bitfit adapts a leaf without input axes.*BitFit trains bias vectors.*targets=r'\.\*/bias'"
  )
  with pytest.raises(ValueError, match=refusal):
    reparam.init(jax.random.key(0), AdapterConfig(targets="layer/kernel", method="bitfit"), mc.dense_params(3, 2))
