"""Quantized frozen weights (NF4 / int4 / int8) as pytree data, and adapters trained and merged on them.

    from jaxpeft import quantize
    qbase = quantize.quantize_tree(params, r".*/kernel", fmt="nf4", block_size=64, double_quant=True)
    params = quantize.apply(qbase, adapter, config)       # inside the jitted step: dequantize, then the adapter
    merged = quantize.merge(qbase, adapter, config)       # dequantize, merge in float32, re-quantize

Files: ``codebooks`` (NF4, int4, the 8-bit dynamic map), ``blockwise`` (absmax blocks, 4-bit packing, double
quantization), ``quantized_array`` (the ``QuantizedArray`` leaf), ``tree`` (regex selection over a tree),
``adapted`` (adapters on a quantized base), ``merge`` (merging back and its error).
"""

from jaxpeft.quantize.adapted import apply
from jaxpeft.quantize.merge import merge, merge_error
from jaxpeft.quantize.quantized_array import FORMATS, QuantizedArray, quantize_array
from jaxpeft.quantize.tree import (
    bytes_per_param,
    check_frozen,
    dequantize_tree,
    is_quantized,
    quantize_tree,
    quantized_paths,
)

__all__ = [
    "FORMATS",
    "QuantizedArray",
    "apply",
    "bytes_per_param",
    "check_frozen",
    "dequantize_tree",
    "is_quantized",
    "merge",
    "merge_error",
    "quantize_array",
    "quantize_tree",
    "quantized_paths",
]
