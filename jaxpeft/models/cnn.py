"""Small image classifiers for the harness: a CNN and an MLP (Flax linen)."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft import canonical_dot


class CNN(nn.Module):
  """Conv(3x3) -> ReLU -> [avg-pool] blocks, then Dense -> ReLU -> Dense logits.

  Attributes:
    num_classes: number of output logits.
    features: channels of each conv block; every block but the last halves the spatial size.
    hidden: width of the dense layer before the logits.
  """

  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    del train  # No dropout or batch statistics: the same function in train and eval.
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), name=f"conv_{i}")(x))
      if i < len(self.features) - 1:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dot_general=canonical_dot.dot_general, name="dense")(x))
    return nn.Dense(self.num_classes, dot_general=canonical_dot.dot_general, name="head")(x)


class MLP(nn.Module):
  """Flatten -> (Dense -> ReLU)* -> Dense logits."""

  num_classes: int
  hidden: Sequence[int] = (256, 128)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    del train
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, dot_general=canonical_dot.dot_general, name=f"dense_{i}")(x))
    return nn.Dense(self.num_classes, dot_general=canonical_dot.dot_general, name="head")(x)
