"""Quickstart: a small CNN on the scikit-learn digits images (offline), trained with AdamW.

Launch (the README's main job):

  python -m launch.train --config=configs/quickstart.py --workdir=workdir/quickstart

Smoke variant (a few steps, for tests and CI):

  python -m launch.train --config=configs/quickstart.py:smoke --workdir=/tmp/qs

Any optimizer by name, on 8 fake CPU devices with fully sharded state:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m launch.train \
    --config=configs/quickstart.py --config.optimizer.name=came --config.sharding.fsdp=True \
    --workdir=workdir/quickstart_came
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg='smoke'` shrinks it to a few steps."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "jaxpeft_digits"
  config.dataset.data_dir = ""  # '' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.input_keys = ("image",)

  # `model.name` picks the model; the section named after it holds its own options.
  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn"  # or 'mlp'
  config.model.num_classes = 10
  config.model.cnn = ml_collections.ConfigDict({"features": (32, 64), "hidden": 128})
  config.model.mlp = ml_collections.ConfigDict({"hidden": (256, 128)})

  # Start from another run's exported weights (export/params); leaves matching keep_fresh
  # (a regex over '/'-joined paths) keep their fresh initialisation.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.params = ""
  config.init_from.keep_fresh = ""

  # Which base leaves are trained ('.*': full fine-tuning; 'head/.*': linear probe).
  config.trainable = ml_collections.ConfigDict()
  config.trainable.base = ".*"

  config.adapter = common.adapter()

  config.optimizer = common.optimizer(3e-3, warmup_steps=50, weight_decay=1e-4)

  config.batch_size = 64
  config.eval_batch_size = 120
  config.num_train_steps = 800
  config.log_every = 50
  config.eval_every = 200

  config.checkpoint = common.checkpoint(every_steps=200, max_to_keep=3)
  config.sharding = common.sharding()
  config.quantize = common.quantize()

  config.progress_bar = True
  config.export = True  # write export/params (merged) and export/adapter.safetensors at the end

  if arg == "smoke":
    config.num_train_steps = 6
    config.log_every = 2
    config.eval_every = 0
    config.checkpoint.every_steps = 3
    config.model.cnn.features = (8,)
    config.model.cnn.hidden = 16
    config.model.mlp.hidden = (16,)
    config.optimizer.warmup_steps = 2
    config.progress_bar = False
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use configs/quickstart.py or :smoke.")
  return config
