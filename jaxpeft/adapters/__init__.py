"""Adapters for Flax models: pure functions over parameter pytrees, plus activation hooks.

    from jaxpeft import adapters
    cfg = adapters.AdapterConfig(targets=r".*(query|value)/kernel", method="lora", rank=8)
    adapter = adapters.init(rng, cfg, params)           # only the adapter leaves
    logits = model.apply({"params": adapters.apply(params, adapter, cfg)}, x)
    merged = adapters.merge(params, adapter, cfg)

Methods are selected by name (`cfg.method`) and live one per module in this package; see
`jaxpeft.adapters.core` for the interface and how to add one.
"""

from jaxpeft.adapters.checkpoint import check_adapter, load_adapter, save_adapter
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Target, get_method, register_method
from jaxpeft.adapters.partition import adapter_value_and_grad, optimizer_labels, param_count
from jaxpeft.adapters.reparam import apply, apply_many, init, init_with_base, merge, unmerge, unmerge_many

__all__ = [
    "AdapterConfig", "AdapterMethod", "Target",
    "adapter_value_and_grad", "apply", "apply_many", "check_adapter", "get_method", "init",
    "init_with_base", "load_adapter", "merge", "optimizer_labels", "param_count", "register_method",
    "save_adapter", "unmerge", "unmerge_many",
]
