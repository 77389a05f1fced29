"""A tiny conv + BatchNorm classifier in Flax and the same one in PyTorch, with shared weights.

Used by the parity tests: the PyTorch side runs transcriptions of the authors' TTA code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

CLASSES, CHANNELS = 3, 4


class TinyBN(nn.Module):
  """conv3x3 (no bias) -> BatchNorm -> ReLU -> spatial mean (sown as features if `sow_features`) -> dense head."""

  sow_features: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.Conv(CHANNELS, (3, 3), use_bias=False, name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x)).mean((1, 2))
    if self.sow_features:
      self.sow("intermediates", "features", x)
    return nn.Dense(CLASSES, name="head")(x)


def flax_model(seed: int = 0, head_scale: float = 4.0, sow_features: bool = False):
  """`(model, params, model_state)`: random weights, a head scaled up for peaky predictions."""
  model = TinyBN(sow_features=sow_features)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 6, 6, 1)))
  params = jax.tree.map(lambda x: x, variables["params"])
  params["head"]["kernel"] = params["head"]["kernel"] * head_scale
  rng = np.random.default_rng(seed)
  params["bn"]["scale"] = jnp.asarray(1 + 0.3 * rng.standard_normal(CHANNELS), jnp.float32)
  params["bn"]["bias"] = jnp.asarray(0.3 * rng.standard_normal(CHANNELS), jnp.float32)
  return model, params, {"batch_stats": variables["batch_stats"]}


class TorchTinyBN(torch.nn.Module):

  def __init__(self, params):
    super().__init__()
    self.conv = torch.nn.Conv2d(1, CHANNELS, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(CHANNELS)
    self.head = torch.nn.Linear(CHANNELS, CLASSES)
    t = lambda x: torch.tensor(np.asarray(x))
    with torch.no_grad():
      self.conv.weight.copy_(t(params["conv"]["kernel"]).permute(3, 2, 0, 1))
      self.bn.weight.copy_(t(params["bn"]["scale"]))
      self.bn.bias.copy_(t(params["bn"]["bias"]))
      self.head.weight.copy_(t(params["head"]["kernel"]).T)
      self.head.bias.copy_(t(params["head"]["bias"]))

  def features(self, x):
    return torch.relu(self.bn(self.conv(x))).mean((2, 3))

  def forward(self, x):
    return self.head(self.features(x))


def configure_like_authors(model: TorchTinyBN):
  """Tent/EATA/SAR `configure_model`: train mode, only BN affine trainable, batch statistics always."""
  model.train()
  model.requires_grad_(False)
  model.bn.requires_grad_(True)
  model.bn.track_running_stats = False
  model.bn.running_mean = None
  model.bn.running_var = None
  return model


def torch_images(images) -> torch.Tensor:
  return torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).contiguous()


def softmax_entropy(x: torch.Tensor) -> torch.Tensor:
  return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def batches(n: int, seed: int = 1, size: int = 8):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((size, 6, 6, 1)).astype(np.float32) for _ in range(n)]


def assert_bn_equal(params, model: TorchTinyBN, rtol=2e-5, atol=2e-6):
  np.testing.assert_allclose(params["bn"]["scale"], model.bn.weight.detach().numpy(), rtol=rtol, atol=atol)
  np.testing.assert_allclose(params["bn"]["bias"], model.bn.bias.detach().numpy(), rtol=rtol, atol=atol)


def numpy_tiny_bn(params, images, normalize):
  """`TinyBN` in numpy; `normalize(h) -> (mean, var)` gives the BatchNorm statistics of the conv output."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in params.items()}
  x = np.pad(np.asarray(images, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  size = images.shape[1]
  h = sum(x[:, i : i + size, j : j + size] @ p["conv"]["kernel"][i, j] for i in range(3) for j in range(3))
  mean, var = normalize(h)
  h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"], 0)
  return h.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
