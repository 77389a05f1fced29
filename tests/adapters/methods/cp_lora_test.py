"""CP-LoRA tests: the update equals a numpy sum of rank-one outer products; the adapted conv equals the base conv
plus the CP branch computed as a sequence of PyTorch convs; merge/unmerge, count, init, checkpoint, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from tests.adapters.conv_checks import (
    C_IN,
    C_OUT,
    FAN_IN,
    K,
    check_conv_training,
    conv_base,
    flax_conv,
    images,
    to_torch_layout,
    torch_conv,
)
from tests.adapters.method_checks import TOL, check_checkpoint_round_trip, check_merge_unmerge

R, ALPHA = 3, 6.0
S = ALPHA / R


def _config(init="default", fan_in=None):
  return AdapterConfig(
      targets="layer/kernel",
      method="cp_lora",
      rank=R,
      alpha=ALPHA,
      init=init,
      fan_in_axes=FAN_IN if fan_in is None else fan_in,
  )


@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4), (3, 2, 3, 4), (2, 3, 2, 3, 4)])  # Dense, 1-D/2-D/3-D conv
def test_update_is_sum_of_rank_one_outer_products(shape):
  base = {"layer": {"kernel": jnp.zeros(shape, jnp.float32)}}
  cfg = _config("random", fan_in={"layer/kernel": len(shape) - 1})
  adapter = reparam.init(jax.random.key(0), cfg, base)["layer"]["kernel"]
  adapter["lam"] = jnp.asarray([0.5, -1.0, 2.0])
  names = [f"spatial_{t}" for t in range(len(shape) - 2)] + ["in", "out"]
  factors = [np.asarray(adapter[n], np.float64) for n in names]
  expect = np.zeros(shape)
  for j in range(R):
    outer = np.asarray(1.0)
    for f in factors:
      outer = np.multiply.outer(outer, f[:, j])
    expect += S * float(adapter["lam"][j]) * outer
  got = reparam.apply(base, {"layer": {"kernel": adapter}}, cfg)["layer"]["kernel"]
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


def test_adapted_conv_is_base_conv_plus_separable_cp_branch():
  """CP branch as convs (Lebedev et al. 2015): 1x1 I->R, depthwise kx1, depthwise 1xk, scale, 1x1 R->O."""
  base = conv_base(1)
  cfg = _config("random")
  adapter = reparam.init(jax.random.key(2), cfg, base)
  f = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in adapter["layer"]["kernel"].items()}
  x = images(3)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  conv2d = torch.nn.functional.conv2d
  h = conv2d(xt, f["in"].T[:, :, None, None])  # (N, R, H, W)
  h = conv2d(h, f["spatial_0"].T[:, None, :, None], padding=(1, 0), groups=R)  # taps along H
  h = conv2d(h, f["spatial_1"].T[:, None, None, :], padding=(0, 1), groups=R)  # taps along W
  h = h * (S * f["lam"])[None, :, None, None]
  branch = conv2d(h, f["out"][:, :, None, None]).numpy().transpose(0, 2, 3, 1)
  expect = torch_conv(to_torch_layout(base["layer"]["kernel"]), base["layer"]["bias"], x) + branch
  np.testing.assert_allclose(flax_conv(reparam.apply(base, adapter, cfg), x), expect, **TOL)
  assert np.abs(branch).max() > 1e-2  # the branch matters


def test_merge_unmerge_count_and_checkpoint(tmp_path):
  base = conv_base(3)
  cfg = _config("random")
  adapter = reparam.init(jax.random.key(4), cfg, base)
  check_merge_unmerge(base, adapter, cfg)
  assert param_count(adapter) == R * (2 * K + C_IN + C_OUT + 1)
  check_checkpoint_round_trip(tmp_path, base, adapter, cfg)


def test_default_init_is_identity_with_bounded_factors():
  base = conv_base(5, c_in=512)
  cfg = _config()
  adapter = reparam.init(jax.random.key(6), cfg, base)
  np.testing.assert_array_equal(reparam.apply(base, adapter, cfg)["layer"]["kernel"], base["layer"]["kernel"])
  leaves = adapter["layer"]["kernel"]
  np.testing.assert_array_equal(leaves["out"], 0.0)
  np.testing.assert_array_equal(leaves["lam"], 1.0)
  c = np.asarray(leaves["in"])  # U(-1/sqrt(I), 1/sqrt(I)), 1536 draws
  bound = 1 / np.sqrt(512)
  assert np.abs(c).max() <= bound and np.abs(c).max() > 0.98 * bound
  np.testing.assert_allclose(c.std(), bound / np.sqrt(3), rtol=0.06)
  for t in range(2):
    u = np.asarray(leaves[f"spatial_{t}"])
    assert u.shape == (K, R) and np.abs(u).max() <= 1 / np.sqrt(K) and np.abs(u).max() > 0


def test_training_reduces_loss():
  check_conv_training(_config(), conv_base(8))


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="fan_in_axes = ndim - 1"):
    reparam.init(jax.random.key(0), _config(fan_in={"layer/kernel": 2}), conv_base(0))
  with pytest.raises(ValueError, match="unknown init"):
    reparam.init(jax.random.key(0), _config("pissa"), conv_base(0))
