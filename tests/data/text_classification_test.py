"""The prepared `jaxpeft_pydoc` dataset against its source: the standard library's docstrings."""

import collections
import functools
import importlib
import json
import os
import subprocess
import sys

import pytest

from jaxpeft.data.text_classification import FAMILIES, TEST_FRACTION, PyDoc

SPLITS = ("train", "test")

# Builds the dataset in a fresh interpreter with another hash seed, fails if TensorFlow got
# imported, and prints every example of every split as JSON.
_BUILD_IN_SUBPROCESS = """
import json, sys
from jaxpeft.data.text_classification import PyDoc
builder = PyDoc(data_dir=sys.argv[1])
builder.download_and_prepare(file_format="array_record")
examples = {}
for split in ("train", "test"):
  source = builder.as_data_source(split=split)
  examples[split] = sorted(
      [source[i]["source"].decode(), source[i]["text"].decode(), int(source[i]["label"])]
      for i in range(len(source))
  )
assert "tensorflow" not in sys.modules, "building jaxpeft_pydoc imported TensorFlow"
print(json.dumps(examples))
"""


def _read(builder: PyDoc) -> dict[str, list[list]]:
  examples = {}
  for split in SPLITS:
    source = builder.as_data_source(split=split)
    examples[split] = sorted(
        [source[i]["source"].decode(), source[i]["text"].decode(), int(source[i]["label"])]
        for i in range(len(source))
    )
  return examples


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, list[list]]:
  builder = PyDoc(data_dir=str(tmp_path_factory.mktemp("pydoc")))
  builder.download_and_prepare(file_format="array_record")
  return _read(builder)


def test_build_is_deterministic_across_processes_and_needs_no_tensorflow(examples, tmp_path):
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  result = subprocess.run(
      [sys.executable, "-c", _BUILD_IN_SUBPROCESS, str(tmp_path)],
      capture_output=True,
      text=True,
      env=env,
      check=False,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == examples


def test_splits_are_disjoint_deduplicated_and_nonempty(examples):
  texts = {split: [text for _, text, _ in examples[split]] for split in SPLITS}
  sources = {split: [source for source, _, _ in examples[split]] for split in SPLITS}
  for split in SPLITS:
    assert len(set(texts[split])) == len(texts[split])
    assert len(set(sources[split])) == len(sources[split])
    assert all(text.strip() for text in texts[split])
  assert not set(texts["train"]) & set(texts["test"])
  assert not set(sources["train"]) & set(sources["test"])


def test_every_label_in_both_splits_with_a_fifth_in_test(examples):
  train = collections.Counter(label for _, _, label in examples["train"])
  test = collections.Counter(label for _, _, label in examples["test"])
  assert sorted(train) == sorted(test) == list(range(len(FAMILIES)))
  for label in train:
    total = train[label] + test[label]
    assert abs(test[label] - TEST_FRACTION * total) <= 0.5
  assert max(train.values()) <= 2 * min(train.values())


@functools.cache
def _docstring_of(source: str) -> str:
  module_name, _, qualname = source.partition(":")
  obj = importlib.import_module(module_name)
  for name in qualname.split("."):
    obj = getattr(obj, name)
  return " ".join(obj.__doc__.split())


def _labels_listing(source: str) -> set[int]:
  """The labels whose FAMILIES entry ("module" or "module:Class") covers a source."""
  module_name, _, qualname = source.partition(":")
  return {
      label
      for label, entries in enumerate(FAMILIES.values())
      for entry in entries
      if entry == module_name or entry == f"{module_name}:{qualname.split('.')[0]}"
  }


def test_each_text_is_from_the_docstring_of_its_source_in_its_labelled_family(examples):
  for source, text, label in examples["train"] + examples["test"]:
    assert text in _docstring_of(source), source
    assert _labels_listing(source) == {label}, source
