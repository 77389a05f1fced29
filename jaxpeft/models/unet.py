"""A small convolutional UNet (Flax linen) for per-pixel classification (segmentation).

The architecture is the UNet of Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", 2015, arXiv:1505.04597, shrunk for 8x8 images: an encoder of
double 3x3 convolutions that halves the resolution at each level, a bottleneck, and a decoder that
doubles it again and concatenates the encoder's output of the same resolution (skip connection):

  e_l = Block(e_{l-1} pooled)                    l = 0..L-1 (e_{-1} pooled = the input)
  b   = Block(avg_pool(e_{L-1}))                 the bottleneck, at 1/2^L resolution
  d_l = Block([upsample(d_{l+1}); e_l])          l = L-1..0 (d_L = b), nearest-neighbour x2
  logits = Conv1x1(d_0)                          (batch, height, width, num_classes)

Block = Conv3x3 -> ReLU -> Conv3x3 -> ReLU ('SAME' padding, so no cropping, unlike the paper's
'VALID' convolutions). There is no normalization layer (the harness keeps no batch statistics).
L = len(features) - 1 levels (2 by default); the image sides must be multiples of 2^L.

Parameter paths ('/'-joined, as adapter target regexes see them); every 3x3 kernel is
(3, 3, in, out), a Conv kernel for the conv adapters (fan_in_axes=3):

  down_{l}/conv_{0,1}/{kernel,bias}   bottleneck/conv_{0,1}/{kernel,bias}
  up_{l}/conv_{0,1}/{kernel,bias}     head/{kernel (1, 1, features[0], num_classes), bias}
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class ConvBlock(nn.Module):
  """Two 'SAME' 3x3 convolutions, each followed by a ReLU."""

  features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(2):
      x = nn.relu(nn.Conv(self.features, (3, 3), name=f"conv_{i}")(x))
    return x


def _upsample(x: jnp.ndarray) -> jnp.ndarray:
  """Nearest-neighbour x2 upsampling of (batch, height, width, channels)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(nn.Module):
  """UNet with per-pixel logits (see the module docstring).

  Attributes:
    num_classes: logits per pixel.
    features: channels of each encoder level, the last entry being the bottleneck's; the UNet
      has `len(features) - 1` down and as many up levels.
  """

  num_classes: int
  features: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    del train  # No dropout or batch statistics: the same function in train and eval.
    levels = len(self.features) - 1
    if levels < 1:
      raise ValueError(
          f"UNet features={tuple(self.features)}: give at least two entries (one level" " and the bottleneck)."
      )
    if x.ndim != 4 or x.shape[1] % 2 ** levels or x.shape[2] % 2**levels:
      raise ValueError(
          f"UNet with {levels} levels expects images (batch, height, width, channels) with height"
          f" and width multiples of {2**levels}; got shape {x.shape}. Use fewer config.model.features."
      )
    skips = []
    for level in range(levels):
      x = ConvBlock(self.features[level], name=f"down_{level}")(x)
      skips.append(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = ConvBlock(self.features[-1], name="bottleneck")(x)
    for level in reversed(range(levels)):
      x = jnp.concatenate([_upsample(x), skips[level]], axis=-1)
      x = ConvBlock(self.features[level], name=f"up_{level}")(x)
    return nn.Conv(self.num_classes, (1, 1), name="head")(x)
