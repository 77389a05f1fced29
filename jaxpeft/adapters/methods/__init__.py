"""The built-in adapter methods, one module each; importing this package registers them all.

Each module defines one ``AdapterMethod`` subclass registered with ``@register_method(name)`` (see
``jaxpeft.adapters.core`` for the interface and how to add a method).
"""

from jaxpeft.adapters.methods import (
    adaptformer,
    allora,
    bitfit,
    conv_dora,
    conv_lora,
    corda,
    cp_lora,
    dora,
    hydra,
    houlsby,
    ia3,
    loha,
    lokr,
    lora,
    mixed_batch,
    nola,
    pela,
    prompt_tuning,
    randlora,
    salt,
    sara,
    sora,
    svd_ft,
    tlora,
    vera,
    vpt,
)

__all__ = [
    "adaptformer", "allora", "bitfit", "conv_dora", "conv_lora", "corda", "cp_lora", "dora", "hydra",
    "houlsby", "ia3", "loha", "lokr", "lora", "mixed_batch",
    "nola", "pela", "prompt_tuning", "randlora", "salt", "sara",
    "sora", "svd_ft", "tlora", "vera", "vpt",
]
