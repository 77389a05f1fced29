"""The small UNet: shapes, parameter count against its closed form, and conv adapters on its kernels."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.partition import param_count
from jaxpeft.models.unet import UNet

FEATURES, CLASSES = (3, 4, 5), 6
CONV_3X3 = r"(down_\d+|bottleneck|up_\d+)/conv_\d/kernel"


def _images(n=2, size=8):
  return jax.random.uniform(jax.random.key(1), (n, size, size, 1))


def _conv(c_in, c_out, k=3):
  return k * k * c_in * c_out + c_out


def test_per_pixel_logits_and_parameter_count():
  model = UNet(num_classes=CLASSES, features=FEATURES)
  params = model.init(jax.random.key(0), _images())["params"]
  assert model.apply({"params": params}, _images()).shape == (2, 8, 8, CLASSES)
  f0, f1, f2 = FEATURES
  expected = (
      _conv(1, f0)
      + _conv(f0, f0)
      + _conv(f0, f1)
      + _conv(f1, f1)  # down_0, down_1
      + _conv(f1, f2)
      + _conv(f2, f2)  # bottleneck
      + _conv(f2 + f1, f1)
      + _conv(f1, f1)
      + _conv(f1 + f0, f0)
      + _conv(f0, f0)  # up_1, up_0 (skips)
      + _conv(f0, CLASSES, k=1)
  )  # 1x1 head
  assert param_count(params) == expected


def test_sizes_the_levels_cannot_halve_are_refused():
  with pytest.raises(ValueError, match="multiples of 4"):
    UNet(num_classes=2, features=FEATURES).init(jax.random.key(0), _images(size=6))


def test_skip_connections_carry_full_resolution_detail():
  """The logits of a pixel depend on the input pixels nearby through the level-0 skip path."""
  model = UNet(num_classes=CLASSES, features=FEATURES)
  params = model.init(jax.random.key(0), _images())["params"]
  x = _images(1)
  grad = jax.grad(lambda x: model.apply({"params": params}, x)[0, 0, 0].sum())(x)
  assert np.abs(np.asarray(grad)[0, 0, 0, 0]) > 0


@pytest.mark.parametrize("variant", ["loralib", "layer_rank"])
def test_conv_lora_on_the_unet_matches_loralib_form_and_merge_equals_apply(variant):
  model = UNet(num_classes=CLASSES, features=FEATURES)
  base = model.init(jax.random.key(0), _images())["params"]
  rank, alpha = 2, 3.0
  config = AdapterConfig(
      targets=CONV_3X3,
      method="conv_lora",
      rank=rank,
      alpha=alpha,
      init="random",
      fan_in_axes={CONV_3X3: 3},
      options={"variant": variant},
  )
  adapter = reparam.init(jax.random.key(2), config, base)
  applied = traverse_util.flatten_dict(reparam.apply(base, adapter, config), sep="/")
  flat_adapter = traverse_util.flatten_dict(adapter, sep="/")
  adapted = 0
  for path, kernel in traverse_util.flatten_dict(base, sep="/").items():
    if path + "/a" not in flat_adapter:
      np.testing.assert_array_equal(applied[path], kernel)
      continue
    adapted += 1
    # loralib's ConvLoRA: Delta W_t = s * (B A).view(O, I, k, k), B = b^T, A = a^T; Flax K = W_t.permute(2, 3, 1, 0).
    k, _, c_in, c_out = kernel.shape
    a, b = np.asarray(flat_adapter[path + "/a"]), np.asarray(flat_adapter[path + "/b"])
    delta_t = (alpha / rank) * (b.T @ a.T).reshape(c_out, c_in, k, k)
    np.testing.assert_allclose(
        applied[path], np.asarray(kernel) + delta_t.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6
    )
  assert adapted == 10  # every 3x3 conv, not the 1x1 head
  outputs = model.apply({"params": reparam.apply(base, adapter, config)}, _images())
  merged = model.apply({"params": reparam.merge(base, adapter, config)}, _images())
  np.testing.assert_allclose(merged, outputs, rtol=1e-6, atol=1e-6)
  assert not np.allclose(outputs, model.apply({"params": base}, _images()), atol=1e-4)
