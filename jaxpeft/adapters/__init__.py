"""Adapters for Flax models: pure functions over parameter pytrees, plus activation hooks.

    from jaxpeft import adapters
    cfg = adapters.AdapterConfig(targets=r".*(query|value)/kernel", method="lora", rank=8)
    adapter = adapters.init(rng, cfg, params)           # only the adapter leaves
    logits = model.apply({"params": adapters.apply(params, adapter, cfg)}, x)
    merged = adapters.merge(params, adapter, cfg)

Methods are selected by name (`cfg.method`) and live one per module in `jaxpeft.adapters.methods`
(`list_methods()` names them all); see
`jaxpeft.adapters.core` for the interface and how to add one.

Many adapters on one model: `AdapterSet` (named add / select / delete / save), `combine` (linear,
concatenation, TIES, SVD on the weight update; from `jaxpeft.merging.lora_updates`), `pad_to_rank` (hot-swap without recompiling),
`jaxpeft.adapters.mixed_batch` (a different adapter per example in one pass). Hugging Face PEFT's
on-disk format: `export_peft` / `import_peft` / `export_merged`. Low-precision bases:
`jaxpeft.adapters.low_precision_merge`.
"""

from jaxpeft.adapters.adapter_set import AdapterSet, load_adapter_set, save_adapter_set
from jaxpeft.adapters.checkpoint import check_adapter, load_adapter, save_adapter
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Target, get_method, list_methods, register_method
from jaxpeft.adapters.hot_swap import pad_to_rank
from jaxpeft.adapters.partition import adapter_value_and_grad, optimizer_labels, param_count
from jaxpeft.adapters.peft_format import default_module_name, export_merged, export_peft, import_peft
from jaxpeft.adapters.reparam import apply, apply_many, init, init_with_base, merge, unmerge, unmerge_many

__all__ = [
    "AdapterConfig",
    "AdapterMethod",
    "AdapterSet",
    "Target",
    "adapter_value_and_grad",
    "apply",
    "apply_many",
    "check_adapter",
    "combine",
    "combined_deltas",
    "default_module_name",
    "export_merged",
    "export_peft",
    "get_method",
    "import_peft",
    "init",
    "init_with_base",
    "list_methods",
    "load_adapter",
    "load_adapter_set",
    "merge",
    "optimizer_labels",
    "pad_to_rank",
    "param_count",
    "register_method",
    "save_adapter",
    "save_adapter_set",
    "unmerge",
    "unmerge_many",
]


def __getattr__(name: str):
  # `combine` lives in jaxpeft.merging.lora_updates, which imports this package: re-exported lazily.
  if name in ("combine", "combined_deltas"):
    from jaxpeft.merging import lora_updates  # pylint: disable=import-outside-toplevel

    return getattr(lora_updates, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
