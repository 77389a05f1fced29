"""Config sections every experiment shares, with their documented defaults.

Each experiment's `get_config` builds its own dataset and model sections and takes these from
here, overriding the values it needs, so a harness knob is added or documented in one place.
"""

from typing import Any, NamedTuple

import ml_collections


class Method(NamedTuple):
  """One row of a method table (`METHODS` of a config file): what is trained, and how."""

  base: str  # trained base leaves (regex)
  adapter: str  # adapter method ('' for none)
  targets: str  # adapter targets (regex)
  learning_rate: float  # peak learning rate
  rank: int = 8
  options: dict[str, Any] = {}  # adapter method options (`config.adapter.options`)
  update: dict[str, Any] = {}  # the method's own update rule (`config.adapter.update`: SoRA)
  init: str = "default"  # the adapter's init (`config.adapter.init`)
  penalty: dict[str, Any] = {}  # the method's loss term (`config.adapter.penalty`: SaRA's nuclear norm)
  reselect_every: int = 0  # steps between the method's re-selections (`config.adapter.reselect_every`: SaRA)


def method_and_variants(
    arg: str | None, methods: Any, config_file: str, default: str, variants: tuple[str, ...] = ("smoke",)
) -> tuple[str, set[str]]:
  """`arg` = '<method>[:<variant>]...' (method: a key of `methods`, each variant one of `variants`, at most once).

  Returns `(method, the set of variants given)`.
  """
  method, *given = (arg or default).split(":")
  if method not in methods or not set(given) <= set(variants) or len(set(given)) < len(given):
    usage = "".join(f"[:{v}]" for v in variants)
    raise ValueError(
        f"Unknown config argument {arg!r}; use configs/{config_file}:<method>{usage} with"
        f" <method> one of {sorted(methods)}."
    )
  return method, set(given)


def dataset(name: str, *, input_keys: tuple[str, ...], eval_split: str = "test") -> ml_collections.ConfigDict:
  """`config.dataset`: a tensorflow-datasets builder and the batch keys the model takes (in order)."""
  return ml_collections.ConfigDict(
      {
          "name": name,
          "data_dir": "",  # '' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets
          "train_split": "train",
          "eval_split": eval_split,
          "input_keys": input_keys,
      }
  )


def init_from(params: Any = "", keep_fresh: str = "") -> ml_collections.ConfigDict:
  """`config.init_from`: start from exported or pretrained weights (`params`, '' for a fresh init).

  Leaves matching `keep_fresh` (a regex over '/'-joined paths, e.g. a new head) keep their fresh init.
  """
  return ml_collections.ConfigDict({"params": params, "keep_fresh": keep_fresh})


def trainable(base: str) -> ml_collections.ConfigDict:
  """`config.trainable`: which base leaves are trained ('.*': full fine-tuning; 'head/.*': linear probe)."""
  return ml_collections.ConfigDict({"base": base})


def adapter(method: str = "", targets: str = "", rank: int = 8, alpha: float = 8.0) -> ml_collections.ConfigDict:
  """`config.adapter`: a `jaxpeft.adapters` method ('' for none), e.g. --config.adapter.method=lora."""
  return ml_collections.ConfigDict(
      {
          "method": method,
          "targets": targets,  # regex over '/'-joined parameter paths
          "rank": rank,
          "alpha": alpha,
          "dropout": 0.0,  # factored mode only
          "use_rslora": False,
          "init": "default",
          "mode": "reparam",  # 'reparam' (rebuild weights) or 'factored' (activation hooks)
          "options": ml_collections.ConfigDict(),  # method-specific options
          # The method's loss term (its `loss_term` hook): sara penalty.lambda_rank, sora penalty.sparse_lambda.
          "penalty": ml_collections.ConfigDict(),
          # Pattern fields of jaxpeft.adapters.AdapterConfig, as ((regex, value), ...) pairs, e.g.
          # --config.adapter.fan_in_axes="(('.*conv.*/kernel', 3),)" to adapt Conv kernels (kh, kw, in, out).
          "fan_in_axes": (),  # input axes of leaves with more than two axes (DenseGeneral, Conv)
          "rank_pattern": (),  # per-leaf rank overrides
          "alpha_pattern": (),  # per-leaf alpha overrides
          "stacked_axes": (),  # leading stacked-layer axes of scanned layers
          # The method's own update rule, e.g. SoRA's: update.sparse_lambda.
          "update": ml_collections.ConfigDict(),
          "reselect_every": 0,  # steps between the method's re-selections (SaRA's progressive schedule); 0: off
          "calibration_batches": 8,  # training batches a calibrated init (CorDA) reads before training
      }
  )


def method_adapter(spec: Method) -> ml_collections.ConfigDict:
  """`config.adapter` of a method row: its targets, rank and `alpha = 2 rank`, init, options and hooks."""
  config = adapter(spec.adapter, spec.targets, rank=spec.rank, alpha=2.0 * spec.rank)
  config.init = spec.init
  config.options = ml_collections.ConfigDict(spec.options)
  config.update = ml_collections.ConfigDict(spec.update)
  config.penalty = ml_collections.ConfigDict(spec.penalty)
  config.reselect_every = spec.reselect_every
  return config


def optimizer(
    learning_rate: float,
    *,
    warmup_steps: int,
    weight_decay: float | None,
    grad_clip_norm: float = 0.0,
    name: str = "adamw",
) -> ml_collections.ConfigDict:
  """`config.optimizer`: any jaxpeft or optax optimizer by name, with a warm-up + cosine schedule.

  See jaxpeft/train/optimizer.py for how the fields reach the factory. Examples:
  --config.optimizer.name=sam --config.optimizer.kwargs.rho=0.1 --config.optimizer.kwargs.base_optimizer=adamw
  --config.optimizer.name=adafactor --config.optimizer.weight_decay=None
  """
  return ml_collections.ConfigDict(
      {
          "name": name,
          "learning_rate": learning_rate,
          "schedule": "cosine",  # or 'constant'
          "warmup_steps": warmup_steps,
          "grad_clip_norm": grad_clip_norm,  # 0: off
          # None keeps the optimizer's own default; only hyperparameters it takes may be set
          # (weight_decay excepted: an optimizer without it gets L2 on the gradient).
          "b1": None,
          "b2": None,
          "b3": None,
          "eps": None,
          "weight_decay": weight_decay,
          # Any other argument of the factory, by name (--config.optimizer.kwargs.rho=0.1).
          "kwargs": ml_collections.ConfigDict(),
      }
  )


def checkpoint(every_steps: int, max_to_keep: int) -> ml_collections.ConfigDict:
  """`config.checkpoint`: periodic (and final) asynchronous Orbax saves."""
  return ml_collections.ConfigDict({"every_steps": every_steps, "max_to_keep": max_to_keep, "async_save": True})


def sharding() -> ml_collections.ConfigDict:
  """`config.sharding`: how the step is parallelised and compiled."""
  return ml_collections.ConfigDict(
      {
          "parallelism": "jit",  # 'jit' (Mesh + NamedSharding) or 'pmap'
          "fsdp": False,  # shard params and optimizer state over the data axis
          "num_devices": 0,  # 0: every device; N: the first N (single-process jobs)
          # Devices on the 'model' mesh axis: tensor parallelism by the model's rules (jaxpeft/train/sharding.py),
          # a (devices/N) x N data x model mesh; 1: data parallelism only. jit only; must divide each process's devices.
          "model_parallel": 1,
          # Train steps per compiled call (a lax.scan over that many batches); log, eval, checkpoint and
          # re-selection intervals and num_train_steps must be multiples of it. jit only.
          "steps_per_call": 1,
      }
  )


def quantize(targets: str = r".*/kernel") -> ml_collections.ConfigDict:
  """`config.quantize`: the frozen base stored quantized (QLoRA), off by default (`format=''`).

  See jaxpeft/train/quantized_base.py. Frozen leaves matching `targets` (leaves the run trains never are)
  become NF4 / int4 blocks or int8 channels, dequantized inside the step, e.g.
  --config.quantize.format=nf4 --config.quantize.double_quant=True
  """
  return ml_collections.ConfigDict(
      {
          "format": "",  # '' (off), 'nf4', 'int4' or 'int8'
          "targets": targets,  # regex over '/'-joined parameter paths
          "block_size": 64,  # entries per absmax block (4-bit formats); must divide each leaf's size
          "double_quant": False,  # quantize the block scales too (4-bit formats)
          "export_keep": "quantized",  # merged export: 'quantized' (re-quantized), 'bfloat16' or 'float32'
      }
  )
