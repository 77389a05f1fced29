"""Train and eval steps on dense (per-pixel) predictions, against numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxpeft.train.state import TrainState
from jaxpeft.train.step import make_eval_step, make_train_step
from jaxpeft.train.trainable import Trainable

B, H, W, C = 4, 3, 2, 3


class PixelLinear(nn.Module):

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    return nn.Dense(C)(x)


def _setup():
  config = ml_collections.ConfigDict({"trainable": {"base": ".*"}, "adapter": {"method": "", "mode": "reparam"}})
  trainable = Trainable.from_config(PixelLinear(), config)
  rng = np.random.default_rng(0)
  batch = {
      "image": jnp.asarray(rng.normal(size=(B, H, W, 2)), jnp.float32),
      "label": jnp.asarray(rng.integers(0, C, size=(B, H, W)), jnp.int32),
      "mask": jnp.array([True, True, True, False]),
  }
  params, frozen = trainable.split(
      jax.random.key(0), PixelLinear().init(jax.random.key(1), batch["image"])["params"]
  )
  tx = optax.sgd(0.1)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params), rng=jax.random.key(2)
  )
  logits = np.asarray(trainable.apply(params, frozen, [batch["image"]], train=False), np.float64)
  return trainable, tx, state, batch, logits


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_eval_step_sums_pixels_of_real_examples_and_class_iou():
  trainable, _, state, batch, logits = _setup()
  sums = jax.jit(make_eval_step(trainable))(state, batch)
  labels, real = np.asarray(batch["label"])[:3], logits[:3]  # the 4th example is padding
  nll = -np.take_along_axis(_log_softmax(real), labels[..., None], -1)[..., 0]
  predictions = real.argmax(-1)
  np.testing.assert_allclose(sums["loss"], nll.sum(), rtol=1e-5)
  assert float(sums["count"]) == 3 * H * W
  assert float(sums["correct"]) == (predictions == labels).sum()
  for c in range(C):
    assert float(sums["intersection"][c]) == ((predictions == c) & (labels == c)).sum()
    assert float(sums["union"][c]) == ((predictions == c) | (labels == c)).sum()


def test_train_step_averages_the_loss_over_pixels():
  trainable, tx, state, batch, logits = _setup()
  _, metrics = jax.jit(make_train_step(trainable, tx))(state, batch)
  labels = np.asarray(batch["label"])
  nll = -np.take_along_axis(_log_softmax(logits), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(metrics["loss"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == labels).mean(), rtol=1e-6)
