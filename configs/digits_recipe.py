"""The "pretrain, then adapt" recipe shared by configs/digits_vit.py and configs/digits_unet.py.

A recipe has a `pretrain` stage (every parameter trained on the source task) and adaptation
methods (`Method`) that start from the pretrain run's export (`<pretrain workdir>/export/params`,
through `config.init_from.params`) and train on the target task. The source and target tasks
differ only in `config.dataset` fields (e.g. `classes`, `shift`). `build` turns a recipe and the
config argument ('<method>' or '<method>:smoke') into a config.
"""

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections

from configs import common

PRETRAIN = "pretrain"


class Method(NamedTuple):
  """One way to train: which base leaves, which adapter (if any), and the peak learning rate."""

  base: str  # regex of the trained base leaves ('.*': all, '': none)
  learning_rate: float
  adapter: str = ""  # a jaxpeft.adapters method name, '' for none
  targets: str = ""  # regex of the adapted leaves
  options: Mapping[str, Any] = {}  # the adapter method's options


class Recipe(NamedTuple):
  """Everything that differs between the ViT and the UNet recipes."""

  name: str  # configs/<name>.py; the default pretrain workdir is workdir/<name>/pretrain
  dataset: str
  model: Mapping[str, Any]
  smoke_model: Mapping[str, Any]  # model overrides for ':smoke'
  source: Mapping[str, Any]  # config.dataset fields of the pretraining task
  target: Mapping[str, Any]  # config.dataset fields of the adaptation task
  keep_fresh: str  # leaves re-initialised when adapting (a new head)
  fan_in_axes: tuple[tuple[str, int], ...]  # input axes of the >2-D adapted leaves
  methods: Mapping[str, Method]  # includes PRETRAIN
  num_train_steps: Mapping[str, int]  # PRETRAIN and 'adapt'
  rank: int = 4


def pretrain_export(recipe: Recipe) -> str:
  """The default `init_from.params` of the adaptation methods (absolute: Orbax needs it)."""
  return os.path.abspath(os.path.join("workdir", recipe.name, PRETRAIN, "export", "params"))


def build(recipe: Recipe, arg: str | None) -> ml_collections.ConfigDict:
  """The config of `arg` = '<method>' or '<method>:smoke' (default 'pretrain')."""
  method_name, variants = common.method_and_variants(arg, recipe.methods, f"{recipe.name}.py", default=PRETRAIN)
  smoke = "smoke" in variants
  method = recipe.methods[method_name]
  pretraining = method_name == PRETRAIN

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = method_name

  config.dataset = common.dataset(recipe.dataset, input_keys=("image",))
  config.dataset.classes = ()  # () keeps every class
  config.dataset.shift = ""  # '' for none, else a jaxpeft.data.domain_shift.SHIFTS name
  config.dataset.update(dict(recipe.source if pretraining else recipe.target))

  config.model = ml_collections.ConfigDict(dict(recipe.model))

  # Adaptation starts from the pretrain run's merged export; the new head starts fresh.
  config.init_from = common.init_from(*(() if pretraining else (pretrain_export(recipe), recipe.keep_fresh)))
  config.trainable = common.trainable(method.base)

  config.adapter = common.adapter(method.adapter, method.targets, rank=recipe.rank, alpha=float(recipe.rank))
  config.adapter.options.update(dict(method.options))
  config.adapter.fan_in_axes = recipe.fan_in_axes

  steps = recipe.num_train_steps[PRETRAIN if pretraining else "adapt"]
  config.optimizer = common.optimizer(method.learning_rate, warmup_steps=steps // 10, weight_decay=1e-4)

  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_train_steps = steps
  config.log_every = 25
  config.eval_every = 0

  config.checkpoint = common.checkpoint(every_steps=steps, max_to_keep=1)
  config.sharding = common.sharding()
  config.quantize = common.quantize()

  config.progress_bar = True
  config.export = True

  if smoke:
    config.model.update(dict(recipe.smoke_model))
    config.dataset.eval_split = "test[:64]"
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 4
    config.log_every = 1
    config.optimizer.warmup_steps = 1
    config.checkpoint.every_steps = 4
    config.checkpoint.async_save = False
    config.progress_bar = False
  return config
