"""Pretrains the small BatchNorm ResNet on clean Fashion-MNIST (the source model of test-time adaptation).

  python -m launch.train --config=configs/fashion_resnet.py --workdir=workdir/fashion_resnet

writes `export/params` and `export/model_state` (BatchNorm statistics), which `launch/adapt.py` reads.
Smoke variant (a few steps on a tiny ResNet, for tests): `--config=configs/fashion_resnet.py:smoke`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg='smoke'` shrinks it to a few steps."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "jaxpeft_fashion_mnist"
  config.dataset.data_dir = ""  # '' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.input_keys = ("image",)

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet"
  config.model.num_classes = 10
  config.model.stage_sizes = (1, 1, 1)
  config.model.width = 16

  config.init_from = ml_collections.ConfigDict()
  config.init_from.params = ""
  config.init_from.keep_fresh = ""

  config.trainable = ml_collections.ConfigDict()
  config.trainable.base = ".*"

  config.adapter = common.adapter()
  config.optimizer = common.optimizer(3e-3, warmup_steps=100, weight_decay=1e-4)

  config.batch_size = 128
  config.eval_batch_size = 200
  config.num_train_steps = 2000
  config.log_every = 100
  config.eval_every = 500

  config.checkpoint = common.checkpoint(every_steps=500, max_to_keep=2)
  config.sharding = common.sharding()
  config.quantize = common.quantize()

  config.progress_bar = True
  config.export = True

  if arg == "smoke":
    config.dataset.train_split = "train[:256]"
    config.dataset.eval_split = "test[:40]"
    config.num_train_steps = 4
    config.log_every = 2
    config.eval_every = 0
    config.checkpoint.every_steps = 2
    config.model.stage_sizes = (1, 1)
    config.model.width = 4
    config.batch_size = 32
    config.eval_batch_size = 40
    config.optimizer.warmup_steps = 1
    config.progress_bar = False
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use configs/fashion_resnet.py or :smoke.")
  return config
