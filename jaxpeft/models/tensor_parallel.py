"""Tensor-parallel partition rules: a model's kernel layouts applied to its parameters and adapters.

Mesh axes `data` x `model` (`make_mesh`). A model declares its Megatron-style layout (Shoeybi et al.,
"Megatron-LM", 2019, arXiv:1909.08053) as `Rules`: `(path regex, (input-axis name, output-axis name))`
pairs over '/'-joined parameter paths, e.g. `(r".*q_proj/kernel", ("data", "model"))` for a
column-parallel kernel `(d_in, d_out)`, `("model", "data")` for a row-parallel one. A model class
offers them as its `tensor_parallel_rules` class attribute (jaxpeft/models/gemma3_sharding.py for
Gemma 3), which is what the training harness reads for `config.sharding.model_parallel > 1`.

`param_specs` gives the first matching rule's names to the last two axes of a leaf; with `fsdp=False`
the `data` entries are dropped (parameters replicated over `data`). An axis that the mesh size does
not divide stays unsplit on that mesh axis. Leading axes (a scanned layer axis) are never split;
leaves no rule matches are replicated.

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
# (path regex, (mesh axis of the kernel's input axis, mesh axis of its output axis)) pairs.
Rules = tuple[tuple[str, tuple[str | None, str | None]], ...]


def make_mesh(data: int, model: int, devices: list[jax.Device] | None = None) -> Mesh:
  """A `data` x `model` mesh over the first data*model devices (default: `jax.devices()`)."""
  devices = jax.devices() if devices is None else devices
  if data * model > len(devices):
    raise ValueError(f"A {data}x{model} mesh needs {data * model} devices; {len(devices)} are available.")
  return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA_AXIS, MODEL_AXIS))


def _fit(axis_names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  names = [n if n is not None and size % mesh.shape[n] == 0 else None for n, size in zip(axis_names, shape)]
  return P(*names)


def param_specs(params: Any, rules: Rules, mesh: Mesh, fsdp: bool = True) -> Any:
  """A `PartitionSpec` per parameter leaf, by `rules` (module docstring)."""

  def spec(path: str, leaf) -> P:
    for pattern, names in rules:
      if re.fullmatch(pattern, path):
        names = tuple(n if fsdp or n != DATA_AXIS else None for n in names)
        lead = (None,) * (leaf.ndim - 2)  # the scanned layer axis
        return _fit(lead + names, tuple(leaf.shape), mesh)
    return P()

  return jax.tree_util.tree_map_with_path(lambda key_path, leaf: spec(path_string(key_path), leaf), params)


def adapter_specs(
    adapter: Any, config: AdapterConfig, params: Any, rules: Rules, mesh: Mesh, fsdp: bool = True
) -> Any:
  """A `PartitionSpec` per adapter leaf: its kernel's, rank axis replicated (module docstring)."""
  base = dict(named_leaves(param_specs(params, rules, mesh, fsdp)))
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
