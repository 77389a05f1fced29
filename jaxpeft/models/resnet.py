"""A small ResNet with BatchNorm for 28x28 / 32x32 images (Flax linen).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), CIFAR variant: a 3x3 stem
conv, `len(stage_sizes)` stages of basic blocks (conv-BN-ReLU-conv-BN + shortcut, ReLU), the first
block of every stage after the first striding by 2 (1x1 conv + BN projection shortcut), global average
pooling, a dense head. BatchNorm statistics live in the `batch_stats` collection: `train=True`
normalises with the batch's statistics and updates the running averages (call with
`mutable=['batch_stats']`); `train=False` uses the running averages. The pooled features before the
head are sown as `intermediates/features` (`mutable=['intermediates']` returns them).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft import canonical_dot


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus (projected) shortcut, then ReLU."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = norm("bn2")(nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = norm("shortcut_bn")(
          nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False, name="shortcut_conv")(x)
      )
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem, stages of `BasicBlock`s, global average pooling, dense head.

  Attributes:
    num_classes: number of output logits.
    stage_sizes: blocks per stage.
    width: channels of the first stage; each later stage doubles them.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (1, 1, 1)
  width: int = 16

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem_conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, strides=strides, name=f"stage{i}_block{j}")(x, train)
    features = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", features)  # read by feature-based TTA methods (LAME)
    return nn.Dense(self.num_classes, dot_general=canonical_dot.dot_general, name="head")(features)
