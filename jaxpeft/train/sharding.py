"""Device mesh and sharding rules: data parallelism, optionally with fully sharded state (FSDP).

One mesh axis, `data`, spans every device of every process. Batches are split over it along
their leading axis. Parameters and optimizer state are either replicated (plain data
parallelism) or, with `fsdp=True`, each leaf is split over `data` along its largest axis that
the device count divides (leaves with no such axis, e.g. scalars, stay replicated) — the
rule big_vision calls `fsdp`. XLA inserts the all-gathers and reduce-scatters.

Adapter leaves get the same rule as every other leaf; they do not copy their base kernel's spec.
For low-rank factors of a kernel `(d_in, d_out)` the rule already splits `a: (d_in, r)` along `d_in` and
`b: (r, d_out)` along `d_out` (rank is the small axis), so adapter storage and optimizer state are
spread evenly. Copying the kernel's spec instead would be worse on this one-axis mesh: a kernel
split along `d_in` would leave `b` replicated, a kernel split along `d_out` would leave `a`
replicated, and which axis a method's leaf shares with the kernel is method-specific (a
magnitude vector reads `d_out`, frozen random projections may be shared across layers). FSDP
gathers every leaf before use, so the choice changes memory balance only, never the results
(tests/train/sharding_test.py checks both). Following the kernel pays off with a model-parallel
mesh axis, which this harness does not have.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def _leaf_spec(shape: tuple[int, ...], num_shards: int, fsdp: bool) -> P:
  if not fsdp or num_shards == 1:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0 and shape[axis] >= num_shards:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: PyTree, mesh: Mesh, fsdp: bool) -> PyTree:
  """NamedShardings for every leaf of a (possibly abstract) pytree under the rule above."""
  n = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(tuple(x.shape), n, fsdp)), abstract_state)


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
  n, p = mesh.devices.size, jax.process_count()
  if global_batch_size % n:
    raise ValueError(
        f"config.batch_size={global_batch_size} is not divisible by the number of devices ({n})."
        f" Use a multiple of {n}, e.g. --config.batch_size={max(n, global_batch_size // n * n)}."
    )
  if global_batch_size % p:
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by the {p} processes.")
