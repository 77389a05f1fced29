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

  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn"
  config.model.num_classes = 10
  config.model.features = (32, 64)
  config.model.hidden = 128

  # Start from another run's exported weights (export/params); leaves matching keep_fresh
  # (a regex over '/'-joined paths) keep their fresh initialisation.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.params = ""
  config.init_from.keep_fresh = ""

  # Which base leaves are trained ('.*': full fine-tuning; 'head/.*': linear probe).
  config.trainable = ml_collections.ConfigDict()
  config.trainable.base = ".*"

  # An adapter from jaxpeft.adapters ('' for none), e.g. --config.adapter.method=lora.
  config.adapter = ml_collections.ConfigDict()
  config.adapter.method = ""
  config.adapter.targets = ""
  config.adapter.rank = 8
  config.adapter.alpha = 8.0
  config.adapter.dropout = 0.0
  config.adapter.use_rslora = False
  config.adapter.init = "default"
  config.adapter.mode = "reparam"  # 'reparam' (rebuild weights) or 'factored' (activation hooks)
  config.adapter.options = ml_collections.ConfigDict()

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.grad_clip_norm = 0.0  # 0: off
  # None keeps the optimizer's own default; only hyperparameters it takes may be set.
  config.optimizer.b1 = None
  config.optimizer.b2 = None
  config.optimizer.b3 = None
  config.optimizer.eps = None
  config.optimizer.weight_decay = 1e-4

  config.batch_size = 64
  config.eval_batch_size = 120
  config.num_train_steps = 800
  config.log_every = 50
  config.eval_every = 200

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 200
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.sharding = ml_collections.ConfigDict()
  config.sharding.parallelism = "jit"  # 'jit' (Mesh + NamedSharding) or 'pmap'
  config.sharding.fsdp = False  # shard params and optimizer state over the data axis
  config.sharding.num_devices = 0  # 0: every device; N: the first N (single-process jobs)

  config.progress_bar = True
  config.export = True  # write export/params (merged) and export/adapter.safetensors at the end

  if arg == "smoke":
    config.num_train_steps = 6
    config.log_every = 2
    config.eval_every = 0
    config.checkpoint.every_steps = 3
    config.model.features = (8,)
    config.model.hidden = 16
    config.optimizer.warmup_steps = 2
    config.progress_bar = False
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use configs/quickstart.py or :smoke.")
  return config
