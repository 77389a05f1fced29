"""A data source restricted to some classes and relabelled, for "pretrain on some classes, adapt to others".

`ClassSubset(source, classes=(5, 6, 7, 8, 9))` keeps the examples of `source` whose `label` is
one of `classes`, in source order, and gives them the label `classes.index(label)`, so a model
with `len(classes)` logits trains on them. A class without examples in `source` (e.g. in a small
slice of a split) is allowed; a subset with no example at all is an error. It is random-access like the TFDS sources it wraps
(`len`, `[i]`, `__getitems__`), so `BatchLoader` and `eval_batches` use it unchanged.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np


def _examples(source: Sequence[Any], rows: Sequence[int]) -> list[dict[str, Any]]:
  getitems = getattr(source, "__getitems__", None)
  return getitems(list(rows)) if getitems is not None else [source[r] for r in rows]


class ClassSubset:
  """The examples of `source` with a label in `classes`, relabelled to their position in `classes`."""

  def __init__(self, source: Sequence[Any], classes: Sequence[int], label_key: str = "label"):
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes):
      raise ValueError(f"classes={classes}: give one or more distinct class ids, e.g. (0, 1, 2, 3, 4).")
    labels = np.array([int(e[label_key]) for e in _examples(source, range(len(source)))])
    self.indices = np.flatnonzero(np.isin(labels, classes))
    if not len(self.indices):
      raise ValueError(
          f"classes={classes}: the source has no example of these classes; its labels are"
          f" {sorted(set(labels.tolist()))}. Check config.dataset.classes."
      )
    self.classes = classes
    self.label_key = label_key
    self._new_label = {c: i for i, c in enumerate(classes)}
    self._source = source

  def __len__(self) -> int:
    return len(self.indices)

  def _relabel(self, example: dict[str, Any]) -> dict[str, Any]:
    return {**example, self.label_key: np.int64(self._new_label[int(example[self.label_key])])}

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._relabel(self._source[int(self.indices[i])])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._relabel(e) for e in _examples(self._source, [int(self.indices[i]) for i in indices])]
