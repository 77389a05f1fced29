"""Dataset sources: TFDS random-access sources of one split, prepared on first use, and class selection.

No TensorFlow is needed: datasets are stored as `array_record` and read through
`builder.as_data_source(...)`, which returns numpy examples by index. `get_data_source(name, split,
data_dir)` prepares the dataset into `data_dir` on first use: jaxpeft's own builders (`DATASETS`) prepare
offline; any other name is looked up in the TFDS catalog and downloaded. `get_preprocess` gives a
dataset's preprocess (`jaxpeft.data.preprocess`); `select_classes` keeps and relabels some classes
(`config.dataset.classes`).
"""

import contextlib
import fcntl
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import ml_collections
import tensorflow_datasets as tfds

from jaxpeft.data import causal_lm, class_subset, digits, fashion_mnist, text_classification, wordnet_glosses
from jaxpeft.data.preprocess import (
    Preprocess,
    dataset_option,
    digits_segmentation_preprocess,
    digits_shift_preprocess,
    text_preprocess,
    uint8_image_preprocess,
)

DataSource = Sequence[Any]  # `len(source)` and `source[i]`, optionally `source.__getitems__`.

FILE_FORMAT = "array_record"


def select_classes(source: DataSource, dataset_config: ml_collections.ConfigDict | None) -> DataSource:
  """`source` restricted to `dataset_config.classes`, relabelled 0..n-1 in that order; unchanged if unset.

  See `jaxpeft.data.class_subset.ClassSubset` (e.g. `classes=(5, 6, 7, 8, 9)`: digit 5 gets label 0).
  """
  classes = tuple(dataset_option(dataset_config, "classes", ()) or ())
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
    wordnet_glosses.WordNetGlosses.name: DatasetEntry(
        wordnet_glosses.WordNetGlosses, causal_lm.causal_lm_preprocess
    ),
}


def get_preprocess(name: str, dataset_config: ml_collections.ConfigDict | None = None) -> Preprocess:
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


def _check_reachable(name: str, builder: tfds.core.DatasetBuilder, data_dir: str, elsewhere: str) -> None:
  """Fails in seconds when the hosts `builder` downloads from cannot be reached (TFDS would retry for minutes)."""
  hosts = sorted({urllib.parse.urlsplit(url).hostname for url in (builder.url_infos or {})} - {None})
  for host in hosts:
    try:
      socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
      raise RuntimeError(
          f"Dataset {name!r} is not prepared in {data_dir} and needs a download from {host}, which cannot be"
          f" reached ({e}; no network?). {elsewhere}"
      ) from None


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
  _check_reachable(name, builder, data_dir, elsewhere)
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
  return data_dir or os.environ.get(
      "JAXPEFT_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  )


def get_data_source(name: str, split: str, data_dir: str) -> tuple[DataSource, tfds.core.DatasetInfo]:
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
