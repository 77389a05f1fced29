"""Label noise: a training source whose labels are flipped for a fixed random fraction of its examples."""

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxpeft.data.sources import DataSource


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
