"""Merging N runs' exports: `python -m launch.merge --config=configs/merge_models.py:ties --workdir=OUT
--config.inputs=RUN_A,RUN_B --config.base=PRETRAIN/export/params`.

The argument picks the method (task_arithmetic, ties, dare, linear); `:adapter_linear` / `:adapter_ties`
merge the runs' adapter files instead (kind='adapter').
"""

import ml_collections


def get_config(arg: str = "ties") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.inputs = ""  # comma-separated launch.train workdirs
  config.base = ""  # Orbax params the inputs started from (their init_from.params)
  config.check_base = True  # refuse inputs whose export/base_checksum.txt differs from the base's
  config.kind = "params"  # 'params' (export/params) or 'adapter' (export/adapter.safetensors)
  config.method = arg
  config.weights = ()  # one per input; () = 1.0 each
  config.density = 0.2  # TIES: fraction kept by the trim; DARE: keep probability
  config.scale = 1.0  # λ applied to the merged task vector
  config.majority_sign_method = "total"
  config.convention = "paper"  # 'paper' (= PEFT) or 'mergekit'
  config.dare_combination = "ties"
  config.seed = 0  # DARE's masks
  config.adapter_rank = ""  # adapters: '' exact, 'max', or an int (truncated SVD)
  config.export_peft = True  # adapters: also write export/peft/ (PEFT's folder layout)
  if arg.startswith("adapter_"):
    config.kind, config.method = "adapter", arg[len("adapter_") :]
  if config.method not in ("task_arithmetic", "ties", "dare", "linear"):
    raise ValueError(
        f"Unknown config argument {arg!r}; use task_arithmetic, ties, dare, linear, adapter_linear "
        "or adapter_ties."
    )
  return config
