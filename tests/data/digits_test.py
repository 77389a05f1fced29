"""The prepared `jaxpeft_digits` dataset against its source, `sklearn.datasets.load_digits()`."""

import numpy as np
import pytest
import sklearn.datasets

from jaxpeft.data.digits import Digits

NUM_DIGITS = 1797  # Rows of load_digits().


def _prepare(data_dir) -> Digits:
  builder = Digits(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  return builder


def _read_split(builder: Digits, split: str) -> list[dict]:
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def builder(tmp_path_factory) -> Digits:
  return _prepare(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def reference():
  return sklearn.datasets.load_digits()


@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_equal_load_digits_at_their_index(builder, reference, split):
  examples = _read_split(builder, split)
  assert len(examples) == builder.info.splits[split].num_examples
  for example in examples:
    i = int(example["index"])
    assert example["image"].dtype == np.uint8
    assert example["image"].shape == (8, 8, 1)
    np.testing.assert_array_equal(example["image"][..., 0], reference.images[i])
    assert int(example["label"]) == reference.target[i]


def test_splits_are_disjoint_and_cover_every_digit(builder):
  train = [int(e["index"]) for e in _read_split(builder, "train")]
  test = [int(e["index"]) for e in _read_split(builder, "test")]
  assert len(set(train)) == len(train) and len(set(test)) == len(test)
  assert not set(train) & set(test)
  assert sorted(train + test) == list(range(NUM_DIGITS))


def test_test_split_is_a_stratified_fifth(builder, reference):
  test_labels = np.array([int(e["label"]) for e in _read_split(builder, "test")])
  per_class_test = np.bincount(test_labels, minlength=10)
  per_class_all = np.bincount(reference.target, minlength=10)
  assert np.all(np.abs(per_class_test - 0.2 * per_class_all) <= 1), per_class_test
  assert builder.info.features["label"].num_classes == 10


def test_preparing_again_gives_identical_splits(builder, tmp_path):
  again = _prepare(tmp_path)
  for split in ("train", "test"):
    first = [int(e["index"]) for e in _read_split(builder, split)]
    second = [int(e["index"]) for e in _read_split(again, split)]
    assert first == second  # Same examples in the same stored order.
