"""ClassSubset: keeps the chosen classes in source order and relabels them by their position."""

import numpy as np
import pytest

from jaxpeft.data import input_pipeline
from jaxpeft.data.class_subset import ClassSubset

LABELS = [3, 0, 7, 3, 5, 0, 9, 7]


def _source():
  return [{"label": np.int64(label), "index": i} for i, label in enumerate(LABELS)]


def test_keeps_the_classes_in_source_order_and_relabels():
  subset = ClassSubset(_source(), classes=(7, 3))
  expected_rows = [i for i, label in enumerate(LABELS) if label in (7, 3)]
  assert len(subset) == len(expected_rows)
  assert [subset[i]["index"] for i in range(len(subset))] == expected_rows
  assert [int(subset[i]["label"]) for i in range(len(subset))] == [(7, 3).index(LABELS[r]) for r in expected_rows]
  batch = input_pipeline.fetch_batch(subset, [2, 0])
  np.testing.assert_array_equal(batch["index"], [expected_rows[2], expected_rows[0]])


def test_select_classes_follows_the_config_and_bad_classes_are_refused():
  source = _source()

  class Config:
    classes = ()

  assert input_pipeline.select_classes(source, Config()) is source
  Config.classes = (0, 9)
  assert len(input_pipeline.select_classes(source, Config())) == 3
  with pytest.raises(ValueError, match="no example of these classes"):
    ClassSubset(source, classes=(4,))
  with pytest.raises(ValueError, match="distinct"):
    ClassSubset(source, classes=(3, 3))
