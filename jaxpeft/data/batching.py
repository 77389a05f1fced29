"""Batches: deterministic multi-host training batches and padded evaluation batches.

* `BatchLoader` is stateless: `batch(step)` depends only on `(seed, step)`, so the global batch is
  the same whatever the number of processes, and resuming at step `k` needs nothing but `k`.
  Epoch `e` visits the examples in the order `numpy.random.default_rng((seed, e)).permutation(n)`,
  in `n // global_batch_size` batches (the last `n % global_batch_size` examples of the
  permutation are skipped that epoch); process `p` of `P` takes rows `[p*B/P, (p+1)*B/P)` of each
  global batch of size `B`.
* `eval_batches` walks a whole split once in split order, padded to full batches, with a boolean
  `mask` of real rows, so metrics summed over `mask` are exact over the split.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxpeft.data.preprocess import Batch, Preprocess
from jaxpeft.data.sources import DataSource


def stack_examples(examples: Sequence[dict[str, Any]]) -> Batch:
  """Stacks per-example dicts (of arrays or scalars, possibly nested) into one array per key."""
  batch = {}
  for key, first in examples[0].items():
    values = [example[key] for example in examples]
    if isinstance(first, dict):
      batch[key] = stack_examples(values)
      continue
    try:
      batch[key] = np.stack([np.asarray(v) for v in values])
    except ValueError as e:
      shapes = sorted({np.shape(v) for v in values})
      raise ValueError(
          f"Feature {key!r} has different shapes across examples ({shapes}), so it cannot be "
          "batched. Pad or crop it to one shape in the dataset builder."
      ) from e
  return batch


def fetch_batch(source: DataSource, indices: Sequence[int] | np.ndarray) -> Batch:
  """The examples of `source` at `indices`, stacked; uses `source.__getitems__` when it has one."""
  indices = [int(i) for i in indices]
  getitems = getattr(source, "__getitems__", None)
  examples = getitems(indices) if getitems is not None else [source[i] for i in indices]
  return stack_examples(examples)


def _check_processes(batch_size: int, process_index: int, process_count: int, what: str) -> int:
  """Validates the process layout; returns the per-process batch size."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index must be in [0, process_count); got process_index={process_index}, "
        f"process_count={process_count}."
    )
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
        f"{what}={batch_size} must be a positive multiple of the number of processes "
        f"({process_count}), so every process gets the same number of rows. Choose a multiple of "
        f"{process_count}."
    )
  return batch_size // process_count


class BatchLoader:
  """Deterministic training batches by step number; each process gets its slice of the batch.

  `batch(step)` is a pure function of `(seed, step)` (and the source): examples of epoch
  `e = step // steps_per_epoch` are visited in the order `default_rng((seed, e)).permutation(n)`
  (or `0..n-1` with `shuffle=False`); the `n % global_batch_size` left over at the end of each
  epoch's order are skipped that epoch. Process `p` of `P` returns rows `[p*L, (p+1)*L)` of the
  global batch, `L = global_batch_size // P`, so concatenating all processes' batches gives the
  same global batch for any `P`.

  Example:
    loader = BatchLoader(source, global_batch_size=128, seed=0,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         preprocess=digits_preprocess)
    for step in range(start_step, num_steps):
      batch = loader.batch(step)
  """

  def __init__(
      self,
      source: DataSource,
      *,
      global_batch_size: int,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      shuffle: bool = True,
      preprocess: Preprocess | None = None,
  ):
    self.local_batch_size = _check_processes(global_batch_size, process_index, process_count, "global_batch_size")
    self.num_examples = len(source)
    if global_batch_size > self.num_examples:
      raise ValueError(
          f"global_batch_size={global_batch_size} is larger than the dataset "
          f"({self.num_examples} examples). Use a batch size of at most {self.num_examples}."
      )
    if seed < 0:
      raise ValueError(f"seed must be a non-negative integer; got {seed}.")
    self.source = source
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle = shuffle
    self.preprocess = preprocess
    self.steps_per_epoch = self.num_examples // global_batch_size
    self._order_cache: tuple[int, np.ndarray] | None = None

  def position(self, step: int) -> dict[str, int]:
    """Where `step` reads in the data: {'step', 'epoch', 'batch_in_epoch'}."""
    if step < 0:
      raise ValueError(f"step must be >= 0; got {step}.")
    epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
    return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the source's examples."""
    if self._order_cache is None or self._order_cache[0] != epoch:
      if self.shuffle:
        order = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
      else:
        order = np.arange(self.num_examples)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def global_indices(self, step: int) -> np.ndarray:
    """Source indices of the whole global batch of `step` (all processes)."""
    position = self.position(step)
    start = position["batch_in_epoch"] * self.global_batch_size
    return self.epoch_order(position["epoch"])[start : start + self.global_batch_size]

  def batch(self, step: int) -> Batch:
    """This process's rows of the global batch of training step `step` (0-based)."""
    start = self.process_index * self.local_batch_size
    indices = self.global_indices(step)[start : start + self.local_batch_size]
    batch = fetch_batch(self.source, indices)
    return self.preprocess(batch) if self.preprocess is not None else batch

  def stacked_batches(self, step: int, count: int) -> Batch:
    """`batch(step), ..., batch(step + count - 1)` stacked on a new leading axis (K steps per compiled call)."""
    batches = [self.batch(s) for s in range(step, step + count)]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def eval_batches(
    source: DataSource,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    preprocess: Preprocess | None = None,
) -> Iterator[Batch]:
  """Every example of `source` once, in order, in global batches of `batch_size`, padded.

  Global batch `j` holds source rows `[j*batch_size, (j+1)*batch_size)`; rows past the end of the
  source repeat the last example and have `mask` False. As in `BatchLoader`, `batch_size` is the
  global size and process `p` gets rows `[p*L, (p+1)*L)`, `L = batch_size // process_count`. Every
  process yields the same number of batches, `ceil(len(source) / batch_size)`, as collective eval
  steps need.

  Yields:
    The (preprocessed) batch of this process, plus `mask`: bool of shape (L,), True for real rows.
  """
  local_batch_size = _check_processes(batch_size, process_index, process_count, "batch_size")
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError("eval_batches got an empty source; check the split name and slicing.")
  num_batches = -(-num_examples // batch_size)
  for j in range(num_batches):
    rows = j * batch_size + process_index * local_batch_size + np.arange(local_batch_size)
    batch = fetch_batch(source, np.minimum(rows, num_examples - 1))
    batch = preprocess(batch) if preprocess is not None else batch
    yield {**batch, "mask": rows < num_examples}
