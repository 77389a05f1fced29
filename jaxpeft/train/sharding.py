"""Device mesh and sharding rules: data parallelism, optionally with fully sharded state (FSDP) and tensor
parallelism.

The mesh (`make_mesh`) has two axes, `data` x `model`, over every device of every process; `model` has
`config.sharding.model_parallel` devices (default 1: plain data parallelism). Batches are split over
`data` along their leading axis and replicated over `model`. Parameters and optimizer state are either
replicated (plain data parallelism) or, with `fsdp=True`, each leaf is split over `data` along its
largest axis that the data-axis size divides (leaves with no such axis, e.g. scalars, stay replicated) —
the rule big_vision calls `fsdp`. XLA inserts the all-gathers and reduce-scatters.

With `model_parallel > 1` the model's own tensor-parallel rules (its `tensor_parallel_rules`,
jaxpeft/models/tensor_parallel.py) lay out its parameters over `model` (and, with `fsdp`, `data`), and
each adapter leaf follows its kernel with the rank axis replicated (`parameter_layouts`). A state leaf
whose path ends with such a parameter's path and has its shape takes that layout: the parameter itself
wherever it sits (`params/base`, `frozen`), and its optimizer-state copies (Adam's `mu` and `nu` mirror
the params' paths); every other leaf takes the rule above.

Without tensor parallelism adapter leaves get the same rule as every other leaf; they do not copy their
base kernel's spec. For low-rank factors of a kernel `(d_in, d_out)` the rule already splits
`a: (d_in, r)` along `d_in` and `b: (r, d_out)` along `d_out` (rank is the small axis), so adapter
storage and optimizer state are spread evenly. Copying the kernel's spec instead would be worse on a
mesh with only `data`: a kernel split along `d_in` would leave `b` replicated, a kernel split along
`d_out` would leave `a` replicated, and which axis a method's leaf shares with the kernel is
method-specific (a magnitude vector reads `d_out`, frozen random projections may be shared across
layers). FSDP gathers every leaf before use, so the choice changes memory balance only, never the
results (tests/train/sharding_test.py checks both). Following the kernel pays off on the `model` axis,
where the low-rank product is then computed next to its kernel's shard.
"""

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.selection import named_leaves, path_string
from jaxpeft.models import tensor_parallel
from jaxpeft.models.tensor_parallel import DATA_AXIS, MODEL_AXIS
from jaxpeft.train.errors import UserError

PyTree = Any
# '/'-joined parameter path -> (the parameter's shape, its PartitionSpec); see `parameter_layouts`.
Layouts = dict[str, tuple[tuple[int, ...], P]]


def make_mesh(devices: list[jax.Device] | None = None, model_parallel: int = 1) -> Mesh:
  """A `data` x `model` mesh over `devices` (default: all devices of all processes), `model_parallel` on `model`.

  A `model` group never spans two processes: each process reads its own rows of the batch, which every
  device of a `data` row must hold.
  """
  devices = jax.devices() if devices is None else devices
  per_process, processes = len(devices) // jax.process_count(), jax.process_count()
  if per_process % model_parallel:
    raise UserError(
        f"config.sharding.model_parallel={model_parallel} does not divide the {per_process} devices of each of"
        f" the {processes} process(es); use a divisor of {per_process} (1: data parallelism only)."
    )
  return tensor_parallel.make_mesh(len(devices) // model_parallel, model_parallel, devices)


def _leaf_spec(shape: tuple[int, ...], num_shards: int, fsdp: bool) -> P:
  if not fsdp or num_shards == 1:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0 and shape[axis] >= num_shards:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def _layout_spec(path: str, shape: tuple[int, ...], layouts: Layouts) -> P | None:
  """The spec of the longest '/'-suffix of `path` that is a parameter of `shape` in `layouts`, or None."""
  parts = path.split("/")
  for start in range(len(parts)):
    layout = layouts.get("/".join(parts[start:]))
    if layout is not None and layout[0] == shape:
      return layout[1]
  return None


def state_shardings(abstract_state: PyTree, mesh: Mesh, fsdp: bool, layouts: Layouts | None = None) -> PyTree:
  """NamedShardings for every leaf of a (possibly abstract) pytree under the rules above.

  `layouts` (`parameter_layouts`): leaves that are, or mirror, a laid-out parameter take its spec.
  """
  n = mesh.shape[DATA_AXIS]

  def leaf_sharding(key_path, x) -> NamedSharding:
    shape = tuple(x.shape)
    spec = _layout_spec(path_string(key_path), shape, layouts) if layouts else None
    return NamedSharding(mesh, _leaf_spec(shape, n, fsdp) if spec is None else spec)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def parameter_layouts(
    model: nn.Module,
    base: PyTree,
    adapter: PyTree | None,
    adapter_config: AdapterConfig | None,
    mesh: Mesh,
    fsdp: bool,
) -> Layouts | None:
  """The model's tensor-parallel layout of its `base` parameters and the `adapter` leaves (under 'adapter/').

  The rules are the model class's `tensor_parallel_rules` (jaxpeft/models/tensor_parallel.py). None on a
  mesh without model parallelism (`model` axis of size 1): every leaf then takes the data-axis rule.
  """
  if mesh.shape[MODEL_AXIS] == 1:
    return None
  rules = getattr(type(model), "tensor_parallel_rules", None)
  if rules is None:
    raise UserError(
        f"config.sharding.model_parallel={mesh.shape[MODEL_AXIS]}: model {type(model).__name__} declares no"
        " tensor-parallel rules (a `tensor_parallel_rules` class attribute, see"
        " jaxpeft/models/tensor_parallel.py); use model_parallel=1, with --config.sharding.fsdp=True to"
        " shard its parameters over the data axis."
    )
  trees = {"": (base, tensor_parallel.param_specs(base, rules, mesh, fsdp))}
  if adapter_config is not None:
    trees["adapter/"] = (adapter, tensor_parallel.adapter_specs(adapter, adapter_config, base, rules, mesh, fsdp))
  layouts = {}
  for prefix, (tree, specs) in trees.items():
    shapes = dict(named_leaves(tree))
    layouts.update({prefix + path: (tuple(shapes[path].shape), spec) for path, spec in named_leaves(specs)})
  return layouts


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Leading (batch) axis split over `data`; with `stacked`, the axis after a leading axis of K batches."""
  return NamedSharding(mesh, P(None, DATA_AXIS) if stacked else P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, stacked: bool = False) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global array sharded over `data`.

  Every process passes its own rows (process p holds rows [p*n, (p+1)*n) of the global batch);
  with one process this is a plain sharded device_put. `stacked`: the arrays stack K batches on a leading axis.
  """
  sharding = batch_sharding(mesh, stacked)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises a clear error if the batch cannot be split evenly over the devices and processes."""
  n, p = mesh.shape[DATA_AXIS], jax.process_count()
  if global_batch_size % n:
    raise ValueError(
        f"config.batch_size={global_batch_size} is not divisible by the number of devices ({n}) on the data axis."
        f" Use a multiple of {n}, e.g. --config.batch_size={max(n, global_batch_size // n * n)}."
    )
  if global_batch_size % p:
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by the {p} processes.")
