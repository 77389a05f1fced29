"""Tensor-parallel + FSDP sharding of Gemma 3 parameters (and their adapters) on a 2-D mesh.

Mesh axes `data` x `model` (`make_mesh`). Megatron-style tensor parallelism (Shoeybi et al.,
"Megatron-LM", 2019, arXiv:1909.08053) over `model`, as transformers' Gemma 3 `base_model_tp_plan`
lays it out ("colwise" q/k/v/gate/up, "rowwise" o/down):

  q/k/v_proj, gate/up_proj kernels (d, n):  P(data, model)   column-parallel (heads / MLP units)
  o_proj, down_proj kernels        (n, d):  P(model, data)   row-parallel
  embed_tokens/embedding           (V, d):  P(model, data)   vocabulary-parallel (also the tied output)
  RMSNorm scales:                           replicated

With `fsdp=False` the `data` entries are dropped (parameters replicated over `data`). An axis that
the mesh size does not divide stays unsplit on that mesh axis (e.g. the 270M model's single
key/value head of 256 units splits over up to 256 devices, the vocabulary over any power of two).
Scanned layers (`layers/...`) have a leading layer axis, never split.

Adapter leaves follow their kernel (`adapter_specs`): a leaf axis the size of the kernel's input
axis takes the kernel's input spec when it is the leaf's first axis, one the size of the output
axis takes the output spec when it is the leaf's last axis; every other axis (the rank) is
replicated. For LoRA a: (d_in, r) -> P(spec_in, None), b: (r, d_out) -> P(None, spec_out), so the
low-rank product is computed where its kernel lives. XLA inserts the collectives; the results do
not depend on the mesh (tests/models/gemma3_sharding_test.py).
"""

import re
from typing import Any

import flax.traverse_util
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.reparam import adapter_leaves
from jaxpeft.adapters.selection import named_leaves, path_string, select_targets

DATA_AXIS, MODEL_AXIS = "data", "model"
# Path regex -> (spec of the input axis, spec of the output axis) before divisibility checks.
_RULES = (
    (r".*self_attn/(q|k|v)_proj/kernel|.*mlp/(gate|up)_proj/kernel", (DATA_AXIS, MODEL_AXIS)),
    (r".*self_attn/o_proj/kernel|.*mlp/down_proj/kernel", (MODEL_AXIS, DATA_AXIS)),
    (r"embed_tokens/embedding", (MODEL_AXIS, DATA_AXIS)),
)


def make_mesh(data: int, model: int, devices: list[jax.Device] | None = None) -> Mesh:
  """A `data` x `model` mesh over the first data*model devices (default: `jax.devices()`)."""
  devices = jax.devices() if devices is None else devices
  if data * model > len(devices):
    raise ValueError(f"A {data}x{model} mesh needs {data * model} devices; {len(devices)} are available.")
  return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA_AXIS, MODEL_AXIS))


def _fit(axis_names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  names = [n if n is not None and size % mesh.shape[n] == 0 else None for n, size in zip(axis_names, shape)]
  return P(*names)


def param_specs(params: Any, mesh: Mesh, fsdp: bool = True) -> Any:
  """A `PartitionSpec` per parameter leaf, by the rules of the module docstring."""

  def spec(path: str, leaf) -> P:
    for pattern, names in _RULES:
      if re.fullmatch(pattern, path):
        names = tuple(n if fsdp or n != DATA_AXIS else None for n in names)
        lead = (None,) * (leaf.ndim - 2)  # the scanned layer axis
        return _fit(lead + names, tuple(leaf.shape), mesh)
    return P()

  return jax.tree_util.tree_map_with_path(lambda key_path, leaf: spec(path_string(key_path), leaf), params)


def adapter_specs(adapter: Any, config: AdapterConfig, params: Any, mesh: Mesh, fsdp: bool = True) -> Any:
  """A `PartitionSpec` per adapter leaf: its kernel's, rank axis replicated (module docstring)."""
  base = dict(named_leaves(param_specs(params, mesh, fsdp)))
  shapes = dict(named_leaves(params))
  specs = {}
  for path, leaves in adapter_leaves(adapter, select_targets(config, params)).items():
    kernel_spec = tuple(base[path]) + (None,) * (shapes[path].ndim - len(tuple(base[path])))
    d_in, d_out = shapes[path].shape[-2:]
    spec_in, spec_out = kernel_spec[-2:]
    for name, leaf in leaves.items():
      names = [None] * leaf.ndim
      if leaf.ndim >= 1 and leaf.shape[-1] == d_out:
        names[-1] = spec_out
      if leaf.ndim >= 2 and leaf.shape[0] == d_in:
        names[0] = spec_in
      specs[tuple(path.split("/")) + (name,)] = _fit(tuple(names), tuple(leaf.shape), mesh)
  return flax.traverse_util.unflatten_dict(specs)


def shardings(specs: Any, mesh: Mesh) -> Any:
  """`NamedSharding`s for a tree of `PartitionSpec`s."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
