"""Config sections every experiment shares, with their documented defaults.

Each experiment's `get_config` builds its own dataset and model sections and takes these from
here, overriding the values it needs, so a harness knob is added or documented in one place.
"""

import ml_collections


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
  """`config.sharding`: how the step is parallelised."""
  return ml_collections.ConfigDict(
      {
          "parallelism": "jit",  # 'jit' (Mesh + NamedSharding) or 'pmap'
          "fsdp": False,  # shard params and optimizer state over the data axis
          "num_devices": 0,  # 0: every device; N: the first N (single-process jobs)
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
