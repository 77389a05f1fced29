"""The harness with BatchNorm: batch_stats in the train step, checkpoints (resume) and the export."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from configs import fashion_resnet
from jaxpeft.data import input_pipeline
from jaxpeft.models.resnet import ResNet
from jaxpeft.train.state import TrainState
from jaxpeft.train.step import make_train_step
from jaxpeft.train.trainable import Trainable


def test_train_step_updates_running_averages_with_the_batch_statistics():
  model = ResNet(num_classes=3, stage_sizes=(1,), width=4)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  trainable = Trainable(model, ".*")
  params, frozen = trainable.split(jax.random.key(2), variables["params"])
  tx = optax.sgd(0.0)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=frozen,
      opt_state=tx.init(params),
      rng=jax.random.key(3),
      model_state={"batch_stats": variables["batch_stats"]},
  )
  new, _ = make_train_step(trainable, tx)(state, {"image": x, "label": jnp.array([0, 1, 2, 0, 1, 2])})
  # Independent: the stem conv by lax, its per-channel batch mean and (biased) variance, momentum 0.9.
  conv = jax.lax.conv_general_dilated(
      x, variables["params"]["stem_conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  stats = new.model_state["batch_stats"]["stem_bn"]
  np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv.var((0, 1, 2)), rtol=1e-5)


def _restore(path, like):
  return ocp.StandardCheckpointer().restore(path, jax.tree.map(np.zeros_like, like))


def test_pretrain_checkpoints_and_exports_batch_stats(pretrained_run, fashion_data_dir):
  workdir, result = pretrained_run
  model_state = result["state"].model_state
  exported = _restore(f"{workdir}/export/model_state", model_state)
  jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(model_state))
  assert float(jnp.abs(model_state["batch_stats"]["stem_bn"]["mean"]).sum()) > 0  # moved from the init (0)
  # The exported params + batch_stats alone give the run's final eval accuracy.
  params = _restore(f"{workdir}/export/params", result["state"].params["base"])
  source, _ = input_pipeline.get_data_source("jaxpeft_fashion_mnist", "test[:40]", fashion_data_dir)
  batch = input_pipeline.uint8_image_preprocess(input_pipeline.fetch_batch(source, range(len(source))))
  config = fashion_resnet.get_config("smoke")
  logits = ResNet(10, stage_sizes=config.model.stage_sizes, width=config.model.width).apply(
      {"params": params, **exported}, batch["image"]
  )
  assert np.mean(np.argmax(logits, -1) == batch["label"]) == result["eval"]["accuracy"]
  # The last numbered checkpoint holds them too (so a resumed run continues from them).
  saved = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/4/state")
  jax.tree.map(np.testing.assert_array_equal, saved["model_state"], jax.device_get(model_state))
