"""`config.quantize`: the run's frozen base stored quantized (QLoRA-style), and what it costs per parameter.

At the start of a fresh run (`Trainable.split`, after the adapter's init on the float weights) the frozen
base leaves whose '/'-joined path fully matches `config.quantize.targets` become `jaxpeft.quantize.QuantizedArray`
leaves (`quantize_tree`). Leaves the run trains (`config.trainable.base`) are never quantized: quantized
weights are frozen. The train and eval steps dequantize inside `jit` (`dequantize_tree`, then the adapter's
own path, as `jaxpeft.quantize.apply`), so only the packed codes stay in memory between steps and in
`checkpoints/frozen/` (Orbax saves the `QuantizedArray` children: codes and scales), and a resume restores
them bit for bit. The merged export follows `jaxpeft.quantize.merge`: `config.quantize.export_keep`
'quantized' re-quantizes the merged leaves to the same format, 'bfloat16' / 'float32' keeps them so (then
the whole exported tree is dequantized, readable by `config.init_from.params`).

    --config.quantize.format=nf4 --config.quantize.double_quant=True --config.quantize.block_size=64
"""

import dataclasses
import os
import re
from typing import Any

import jax
import ml_collections
from flax import traverse_util

from jaxpeft import quantize
from jaxpeft.quantize.merge import KEEP

PyTree = Any


@dataclasses.dataclass(frozen=True)
class QuantizeSpec:
  """What `config.quantize` asks for (`from_config`; None when `config.quantize.format` is '')."""

  fmt: str
  targets: str
  block_size: int
  double_quant: bool
  export_keep: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "QuantizeSpec | None":
    q = config.get("quantize")
    if q is None or not q.format:
      return None
    if q.format not in quantize.FORMATS:
      raise ValueError(f"config.quantize.format={q.format!r}: use one of {quantize.FORMATS}, or '' (off).")
    if q.export_keep not in KEEP:
      raise ValueError(f"config.quantize.export_keep={q.export_keep!r}: use one of {KEEP}.")
    if q.format != "int8" and (not isinstance(q.block_size, int) or q.block_size < 2 or q.block_size % 2):
      raise ValueError(f"config.quantize.block_size={q.block_size!r}: expected an even integer >= 2 (QLoRA: 64).")
    if q.format == "int8" and q.double_quant:
      raise ValueError(
          "config.quantize.double_quant=True applies to the 4-bit formats; int8 has per-channel scales."
      )
    try:
      re.compile(q.targets)
    except re.error as e:
      raise ValueError(f"config.quantize.targets={q.targets!r} is not a regex ({e}).") from None
    return cls(q.format, q.targets, q.block_size, q.double_quant, q.export_keep)

  def quantize_frozen(self, frozen: PyTree, trained_base: PyTree) -> PyTree:
    """`frozen` with its leaves matching `targets` quantized (`trained_base` only names leaves left alone)."""
    frozen_paths = list(traverse_util.flatten_dict(frozen, sep="/"))
    if not any(re.fullmatch(self.targets, p) for p in frozen_paths):
      trained = [p for p in traverse_util.flatten_dict(trained_base, sep="/") if re.fullmatch(self.targets, p)]
      raise ValueError(
          f"config.quantize.targets={self.targets!r} matches no frozen parameter"
          + (f" (it matches trained ones, {trained[:4]}, which are never quantized)" if trained else "")
          + f"; frozen paths: {', '.join(frozen_paths[:12])}{', ...' if len(frozen_paths) > 12 else ''}."
      )
    try:
      return quantize.quantize_tree(frozen, self.targets, self.fmt, self.block_size, self.double_quant)
    except ValueError as e:
      raise ValueError(f"config.quantize (format {self.fmt!r}, block_size {self.block_size}): {e}") from None

  def merged(self, base: PyTree, adapter: PyTree | None, adapter_config: Any, keep: str | None = None) -> PyTree:
    """`quantize.merge` with `keep` (default `export_keep`; no adapter: the base, dequantized unless kept).

    Generation passes keep='float32': re-quantizing would round a small adapter update away (the NF4 step
    of a weight is larger than what a few LoRA steps add to it).
    """
    keep = keep or self.export_keep
    if adapter is not None:
      base = quantize.merge(base, adapter, adapter_config, keep=keep)
    return base if keep == "quantized" else quantize.dequantize_tree(base)


def num_params(tree: PyTree) -> int:
  """Weights in `tree`, a `QuantizedArray` counting those it stands for (not its codes)."""
  return sum(int(x.size) for x in jax.tree.leaves(tree, is_leaf=quantize.is_quantized))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def frozen_footprint(frozen: PyTree, frozen_dir: str | None = None) -> dict[str, float]:
  """Memory (and, with the `checkpoints/frozen/` directory, disk) bytes of the frozen base, per parameter.

  `frozen_params`: weights; `frozen_memory_bytes` / `_per_param`: the arrays held (codes and scales for a
  quantized leaf); `frozen_float32_bytes_per_param`: 4, the unquantized reference; `frozen_disk_bytes` /
  `_per_param`: every file of the Orbax checkpoint (metadata included).
  """
  n = num_params(frozen)
  if n == 0:
    return {}
  memory = round(quantize.bytes_per_param(frozen) * n)
  out = {"frozen_params": n, "frozen_memory_bytes": memory, "frozen_memory_bytes_per_param": memory / n}
  if frozen_dir is not None and os.path.isdir(frozen_dir):
    disk = _dir_bytes(frozen_dir)
    out.update(frozen_disk_bytes=disk, frozen_disk_bytes_per_param=disk / n)
  return out
