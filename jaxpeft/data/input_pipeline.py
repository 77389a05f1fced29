"""Input pipeline: TFDS random-access sources, deterministic multi-host batches, padded eval.

No TensorFlow is needed: datasets are stored as `array_record` and read through
`builder.as_data_source(...)`, which returns numpy examples by index.

* `get_data_source(name, split, data_dir)` gives a random-access source of one split, preparing
  the dataset into `data_dir` on first use. jaxpeft's own builders (`DATASETS`) prepare offline;
  any other name is looked up in the TFDS catalog and downloaded.
* `BatchLoader` is stateless: `batch(step)` depends only on `(seed, step)`, so the global batch is
  the same whatever the number of processes, and resuming at step `k` needs nothing but `k`.
  Epoch `e` visits the examples in the order `numpy.random.default_rng((seed, e)).permutation(n)`,
  in `n // global_batch_size` batches (the last `n % global_batch_size` examples of the
  permutation are skipped that epoch); process `p` of `P` takes rows `[p*B/P, (p+1)*B/P)` of each
  global batch of size `B`.
* `eval_batches` walks a whole split once in split order, padded to full batches, with a boolean
  `mask` of real rows, so metrics summed over `mask` are exact over the split.
* `get_preprocess(name, dataset_config)` turns raw batches into model inputs: each of our datasets
  has a preprocess factory (`DATASETS[name].make_preprocess(dataset_config)`), so a preprocess can
  depend on the config (the text datasets' tokenizer and `max_len`).
* Digits knobs: `config.dataset.classes` keeps and relabels some classes (`select_classes`),
  `config.dataset.shift` applies a deterministic domain shift (`jaxpeft.data.domain_shift`);
  `jaxpeft_digits_segmentation` is the digits with per-pixel labels.
"""

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxpeft.data import (class_subset, digits, digits_segmentation, domain_shift, fashion_mnist,
                          text_classification)
from jaxpeft.models import hf_loader

Batch = dict[str, np.ndarray]
Preprocess = Callable[[Batch], Batch]
DataSource = Sequence[Any]  # `len(source)` and `source[i]`, optionally `source.__getitems__`.

FILE_FORMAT = "array_record"
_UINT8_MAX = 255


def _image_and_label(batch: Batch, max_pixel: int) -> Batch:
  """`image` rescaled from integers in [0, max_pixel] to float32 in [0, 1]; `label` as int32."""
  if "image" not in batch or "label" not in batch:
    raise ValueError(
        f"The image preprocess needs features 'image' and 'label'; this batch has {sorted(batch)}. "
        "Pass a preprocess written for this dataset."
    )
  if not np.issubdtype(batch["image"].dtype, np.integer):
    raise ValueError(
        f"The image preprocess expects integer pixels in [0, {max_pixel}]; got dtype "
        f"{batch['image'].dtype}. Pass a preprocess written for this dataset."
    )
  return {
      "image": batch["image"].astype(np.float32) / max_pixel,
      "label": batch["label"].astype(np.int32),
  }


def digits_preprocess(batch: Batch) -> Batch:
  """`jaxpeft_digits` batch -> image float32 in [0, 1] (pixel / 16), label int32."""
  return _image_and_label(batch, digits.MAX_PIXEL)


def uint8_image_preprocess(batch: Batch) -> Batch:
  """Batch with a uint8 `image` (0..255) and a `label` -> image float32 in [0, 1], label int32."""
  return _image_and_label(batch, _UINT8_MAX)


def text_preprocess(dataset_config: ml_collections.ConfigDict | None) -> Preprocess:
  """A preprocess tokenizing a batch's `text` for BERT-style models.

  The tokenizer is the `tokenizer.json` of `dataset_config.tokenizer` (a Hugging Face folder, or
  'all-MiniLM-L6-v2' for the embedded default; see `jaxpeft.models.hf_loader.resolve_model_dir`),
  loaded once here. Texts become `[CLS] tokens [SEP]`, truncated and right-padded to
  `dataset_config.max_len`.

  Returns:
    `preprocess(batch) -> {input_ids, attention_mask, token_type_ids, label}`, int32 arrays of
    shape (batch, max_len) (label: (batch,)), in the argument order of `BertEncoder.__call__`.
  """
  tokenizer_name = getattr(dataset_config, "tokenizer", None) if dataset_config else None
  max_len = getattr(dataset_config, "max_len", None) if dataset_config else None
  if not tokenizer_name or not max_len:
    raise ValueError(
        "A text dataset needs config.dataset.tokenizer (a Hugging Face folder with tokenizer.json,"
        " or 'all-MiniLM-L6-v2') and config.dataset.max_len (tokens per example); got"
        f" tokenizer={tokenizer_name!r}, max_len={max_len!r}."
    )
  folder = hf_loader.resolve_model_dir(tokenizer_name)
  if not (folder / "tokenizer.json").exists():
    raise FileNotFoundError(f"config.dataset.tokenizer={tokenizer_name!r}: {folder} has no tokenizer.json.")
  tokenizer = hf_loader.Tokenizer(folder / "tokenizer.json")

  def preprocess(batch: Batch) -> Batch:
    if "text" not in batch or "label" not in batch:
      raise ValueError(
          f"The text preprocess needs features 'text' and 'label'; this batch has {sorted(batch)}."
      )
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["text"]]
    return {**tokenizer.encode(texts, int(max_len)), "label": batch["label"].astype(np.int32)}

  return preprocess


def _option(dataset_config: ml_collections.ConfigDict | None, key: str, default: Any) -> Any:
  """`dataset_config.<key>`, or `default` when there is no config or it lacks the key."""
  return default if dataset_config is None else getattr(dataset_config, key, default)


def digits_shift_preprocess(dataset_config: ml_collections.ConfigDict | None) -> Preprocess:
  """`digits_preprocess`, then the domain shift `dataset_config.shift` ('' for none).

  The shifts are `jaxpeft.data.domain_shift.SHIFTS` (e.g. 'invert', 'rotate90').
  """
  shift = _option(dataset_config, "shift", "")
  domain_shift.check_shift(shift)
  return lambda batch: domain_shift.apply_shift(digits_preprocess(batch), shift)


def digits_segmentation_preprocess(dataset_config: ml_collections.ConfigDict | None) -> Preprocess:
  """Digits as per-pixel labels (`jaxpeft.data.digits_segmentation`), then `dataset_config.shift`.

  The foreground threshold is `dataset_config.foreground_threshold` (default 0.5).
  """
  shift = _option(dataset_config, "shift", "")
  threshold = _option(dataset_config, "foreground_threshold", digits_segmentation.DEFAULT_THRESHOLD)
  domain_shift.check_shift(shift)

  def preprocess(batch: Batch) -> Batch:
    return domain_shift.apply_shift(digits_segmentation.segment(digits_preprocess(batch), threshold), shift)

  return preprocess


def select_classes(source: DataSource, dataset_config: ml_collections.ConfigDict | None) -> DataSource:
  """`source` restricted to `dataset_config.classes`, relabelled 0..n-1 in that order; unchanged if unset.

  See `jaxpeft.data.class_subset.ClassSubset` (e.g. `classes=(5, 6, 7, 8, 9)`: digit 5 gets label 0).
  """
  classes = tuple(_option(dataset_config, "classes", ()) or ())
  return class_subset.ClassSubset(source, classes) if classes else source


class DatasetEntry(NamedTuple):
  """One of jaxpeft's own datasets: its TFDS builder class and its preprocess factory.

  `make_preprocess(dataset_config)` returns the batch preprocess; the config (`config.dataset`,
  possibly None) carries what the preprocess needs, e.g. a tokenizer.
  """

  builder: type[tfds.core.GeneratorBasedBuilder]
  make_preprocess: Callable[[ml_collections.ConfigDict | None], Preprocess]


# jaxpeft's own datasets, which prepare offline. Other names go to the TFDS catalog.
DATASETS: dict[str, DatasetEntry] = {
    digits.Digits.name: DatasetEntry(digits.Digits, digits_shift_preprocess),
    # The digits examples with per-pixel labels (same prepared data as jaxpeft_digits).
    "jaxpeft_digits_segmentation": DatasetEntry(digits.Digits, digits_segmentation_preprocess),
    text_classification.PyDoc.name: DatasetEntry(text_classification.PyDoc, text_preprocess),
    fashion_mnist.FashionMnist.name: DatasetEntry(fashion_mnist.FashionMnist, lambda _: uint8_image_preprocess),
}


def get_preprocess(
    name: str, dataset_config: ml_collections.ConfigDict | None = None
) -> Preprocess:
  """The preprocess of dataset `name` for `dataset_config` (`config.dataset`).

  jaxpeft's own datasets (`DATASETS`) build theirs from the config; TFDS catalog datasets get
  `uint8_image_preprocess`.
  """
  if name in DATASETS:
    return DATASETS[name].make_preprocess(dataset_config)
  return uint8_image_preprocess


@contextlib.contextmanager
def _prepare_lock(data_dir: str, name: str) -> Iterator[None]:
  """Holds an exclusive lock on `data_dir` for preparing `name`, so racing processes take turns.

  The lock is an `fcntl.flock` on a file in `data_dir`, which works across processes on one
  machine and on file systems with POSIX locks. Remote paths (`gs://...`) cannot be locked; there
  TFDS' own write-to-temporary-then-rename is the only protection, so prepare remote data dirs
  from a single process first.
  """
  if "://" in data_dir:
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  lock_path = os.path.join(data_dir, re.sub(r"[^\w.-]", "_", name) + ".lock")
  with open(lock_path, "a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of `name`: ours from `DATASETS`, else the TFDS catalog's (or a clear error)."""
  if name in DATASETS:
    return DATASETS[name].builder(data_dir=data_dir, file_format=FILE_FORMAT)
  try:
    return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset {name!r}. jaxpeft's own datasets, which work offline: "
        f"{sorted(DATASETS)}. Any other name must be in the TFDS catalog (tfds.list_builders()); "
        "preparing a catalog dataset downloads it, which needs network access the first time."
    ) from e


def _prepare(name: str, builder: tfds.core.DatasetBuilder, data_dir: str) -> None:
  """Prepares `builder` as array_record; for catalog datasets, errors say how to work offline."""
  if name in DATASETS:
    builder.download_and_prepare(file_format=FILE_FORMAT)
    return
  elsewhere = (
      f"Prepare it on a machine that can download it (tfds.builder({name!r}, data_dir=DIR, "
      f"file_format={FILE_FORMAT!r}).download_and_prepare()), copy DIR here, and pass "
      "--config.dataset.data_dir=DIR."
  )
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    raise ValueError(
        f"Dataset {name!r} is not prepared in {data_dir} and needs files downloaded by hand:\n"
        f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}\n{elsewhere}"
    )
  try:
    builder.download_and_prepare(file_format=FILE_FORMAT)
  except (OSError, tfds.download.DownloadError) as e:
    raise RuntimeError(
        f"Dataset {name!r} is not prepared in {data_dir} and could not be downloaded "
        f"({type(e).__name__}: {e}). {elsewhere}"
    ) from e


def resolve_data_dir(data_dir: str = "") -> str:
  """`data_dir`, or where jaxpeft keeps prepared datasets when it is '' (`config.dataset.data_dir`'s default).

  That place is `$JAXPEFT_DATA_DIR` when it is set, else `~/tensorflow_datasets`.
  """
  return data_dir or os.environ.get("JAXPEFT_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def get_data_source(
    name: str, split: str, data_dir: str
) -> tuple[DataSource, tfds.core.DatasetInfo]:
  """A random-access source of `split` of dataset `name`, and the dataset's `DatasetInfo`.

  The dataset is prepared into `data_dir` as array_record on first use: offline for jaxpeft's own
  datasets (`DATASETS`), by download for TFDS catalog datasets. Several processes may call this at
  once on the same `data_dir`; one prepares while the others wait.

  Args:
    name: a key of `DATASETS` (e.g. 'jaxpeft_digits') or a TFDS catalog name such as 'mnist' or
      'name/config:version'.
    split: a split name, optionally with TFDS slicing ('train', 'test[:10%]').
    data_dir: where prepared datasets live.

  Returns:
    `(source, info)`: `source[i]` is a dict of numpy arrays / Python scalars.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    with _prepare_lock(data_dir, name):
      builder = _builder(name, data_dir)  # Re-read: another process may have prepared it.
      if not builder.is_prepared():
        _prepare(name, builder, data_dir)
  try:
    source = builder.as_data_source(split=split)
  except ValueError as e:
    raise ValueError(
        f"Cannot read split {split!r} of dataset {name!r}: {e} Available splits: "
        f"{sorted(builder.info.splits)} (TFDS slicing such as 'train[:10%]' also works)."
    ) from e
  return source, builder.info


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
    self.local_batch_size = _check_processes(
        global_batch_size, process_index, process_count, "global_batch_size"
    )
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


class LabelNoiseSource:
  """A training source whose labels are flipped for a fixed random fraction of its examples.

  `round(fraction * len(source))` examples, chosen by `numpy.random.default_rng(seed)`, get a
  label drawn uniformly from the *other* `num_classes - 1` classes; the choice is made once, so an
  example keeps its (noisy) label in every epoch and the result does not depend on the batch order.
  Other features are passed through. Wrap only training splits: evaluation labels must stay clean.
  The config knob is `config.dataset.label_noise` (a fraction in [0, 1), 0 = off), seeded by
  `config.seed`; see `with_label_noise`.
  """

  def __init__(self, source: DataSource, *, fraction: float, num_classes: int, seed: int):
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"label_noise={fraction} must be a fraction in [0, 1); e.g. 0.2 flips 20% of the labels.")
    if num_classes < 2:
      raise ValueError(f"Label noise needs at least 2 classes to flip between; got num_classes={num_classes}.")
    self.source = source
    self.num_classes = num_classes
    rng = np.random.default_rng(seed)
    n = len(source)
    self.flipped = np.sort(rng.choice(n, size=round(fraction * n), replace=False))
    self.offsets = np.zeros(n, np.int64)  # label -> (label + offset) % num_classes
    self.offsets[self.flipped] = rng.integers(1, num_classes, size=len(self.flipped))

  def __len__(self) -> int:
    return len(self.source)

  def _noisy(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
    return {**example, "label": (int(example["label"]) + int(self.offsets[index])) % self.num_classes}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._noisy(index, self.source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    getitems = getattr(self.source, "__getitems__", None)
    examples = getitems(indices) if getitems is not None else [self.source[i] for i in indices]
    return [self._noisy(i, e) for i, e in zip(indices, examples)]


def with_label_noise(
    source: DataSource, info: tfds.core.DatasetInfo, dataset_config: ml_collections.ConfigDict, seed: int
) -> DataSource:
  """`source` with `dataset_config.label_noise` of its labels flipped (unchanged when 0 or unset).

  With `dataset_config.classes` set, `source` must be the class-selected one (`select_classes`): the
  labels are flipped among those classes (relabelled 0..n-1), not among all of the dataset's.
  """
  fraction = dataset_config.get("label_noise", 0.0)
  if not fraction:
    return source
  classes = tuple(dataset_config.get("classes", ()) or ())
  if classes:
    return LabelNoiseSource(source, fraction=fraction, num_classes=len(classes), seed=seed)
  label = info.features["label"] if "label" in info.features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(
        f"config.dataset.label_noise={fraction} needs a ClassLabel feature 'label'; dataset {info.name!r} has"
        f" features {sorted(info.features)}. Set label_noise=0 for this dataset."
    )
  return LabelNoiseSource(source, fraction=fraction, num_classes=label.num_classes, seed=seed)
