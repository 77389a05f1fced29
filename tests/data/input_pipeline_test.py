"""Tests of the input pipeline: sources, deterministic multi-process batches, padded eval."""

import json
import subprocess
import sys
import textwrap
import time
from unittest import mock

import numpy as np
import pytest
import requests
import sklearn.datasets

from jaxpeft.data import input_pipeline
from jaxpeft.data.input_pipeline import BatchLoader, eval_batches, get_data_source

DIGITS = "jaxpeft_digits"


class ListSource:
  """A random-access source without `__getitems__`: example `i` is {'id': i, 'x': [i, -i]}."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.n:
      raise IndexError(i)
    return {"id": i, "x": np.array([i, -i], np.int64)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits_test(data_dir):
  return get_data_source(DIGITS, "test", data_dir)


# --- get_data_source -------------------------------------------------------------------------


def test_digits_source_matches_load_digits(digits_test):
  source, info = digits_test
  assert len(source) == info.splits["test"].num_examples == 360
  reference = sklearn.datasets.load_digits()
  batch = input_pipeline.fetch_batch(source, range(len(source)))
  np.testing.assert_array_equal(batch["image"][..., 0], reference.images[batch["index"]])
  np.testing.assert_array_equal(batch["label"], reference.target[batch["index"]])


def test_split_slicing_is_supported(data_dir):
  source, _ = get_data_source(DIGITS, "train[:10]", data_dir)
  assert len(source) == 10


def test_unknown_dataset_lists_our_datasets(data_dir):
  message = r"Unknown dataset 'no_such_dataset'.*jaxpeft_digits.*network"
  with pytest.raises(ValueError, match=message):
    get_data_source("no_such_dataset", "train", data_dir)


def test_unknown_split_lists_the_splits(data_dir):
  message = r"split 'validation'.*Available splits: \['test', 'train'\]"
  with pytest.raises(ValueError, match=message):
    get_data_source(DIGITS, "validation", data_dir)


def test_catalog_dataset_without_network_says_how_to_prepare_it(tmp_path):
  def no_network(url, **kwargs):
    raise requests.exceptions.ConnectionError(f"no network in this test ({url})")

  with mock.patch("tensorflow_datasets.core.download.downloader._open_url", no_network):
    with pytest.raises(RuntimeError, match=r"'mnist' is not prepared.*--config.dataset.data_dir"):
      get_data_source("mnist", "train", str(tmp_path))


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code), *args],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_reading_never_imports_tensorflow(tmp_path):
  result = _run_python(
      """
      import sys
      from jaxpeft.data import input_pipeline as ip
      source, _ = ip.get_data_source("jaxpeft_digits", "train", sys.argv[1])
      loader = ip.BatchLoader(source, global_batch_size=8, seed=0, preprocess=ip.digits_preprocess)
      loader.batch(3)
      next(ip.eval_batches(source, batch_size=8))
      print("tensorflow imported:", "tensorflow" in sys.modules)
      """,
      str(tmp_path),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow imported: False" in result.stdout


def test_two_processes_preparing_the_same_data_dir_both_succeed(tmp_path):
  # Each process signals `ready-K` once imported, then waits for `go`, so the two prepares start
  # together. Without the lock in get_data_source, one of them fails to rename its temporary dir.
  script = """
      import json, pathlib, sys, time
      from jaxpeft.data import input_pipeline as ip
      data_dir, tmp, k = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
      (tmp / f"ready-{k}").touch()
      while not (tmp / "go").exists():
        time.sleep(0.01)
      source, _ = ip.get_data_source("jaxpeft_digits", "train", data_dir)
      print(json.dumps([int(source[i]["index"]) for i in range(len(source))]))
      """
  data_dir = tmp_path / "data"
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", textwrap.dedent(script), str(data_dir), str(tmp_path), str(k)],
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for k in range(2)
  ]
  deadline = time.monotonic() + 120
  while not all((tmp_path / f"ready-{k}").exists() for k in range(2)):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "import failed"
    time.sleep(0.05)
  (tmp_path / "go").touch()
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
  assert first == second and len(first) == 1437


# --- preprocess ------------------------------------------------------------------------------


def test_digits_preprocess_scales_to_unit_interval(digits_test):
  source, _ = digits_test
  raw = input_pipeline.fetch_batch(source, range(16))
  batch = input_pipeline.get_preprocess(DIGITS)(raw)
  assert set(batch) == {"image", "label"}
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  reference = sklearn.datasets.load_digits()
  np.testing.assert_allclose(batch["image"][..., 0], reference.images[raw["index"]] / 16.0)
  np.testing.assert_array_equal(batch["label"], reference.target[raw["index"]])


def test_catalog_datasets_get_the_uint8_preprocess():
  preprocess = input_pipeline.get_preprocess("mnist")
  image = np.array([[0, 51, 255]], np.uint8)
  batch = preprocess({"image": image, "label": np.array([7], np.int64)})
  np.testing.assert_allclose(batch["image"], [[0.0, 0.2, 1.0]])
  assert batch["label"].dtype == np.int32
  with pytest.raises(ValueError, match="needs features 'image' and 'label'.*'text'"):
    preprocess({"text": np.array([b"a"])})


# --- batching --------------------------------------------------------------------------------


def test_fetch_uses_getitems_and_matches_item_by_item(digits_test):
  source, _ = digits_test
  indices = [5, 0, 359, 5]
  with mock.patch.object(
      type(source), "__getitems__", autospec=True, side_effect=type(source).__getitems__
  ) as getitems:
    batched = input_pipeline.fetch_batch(source, indices)
  getitems.assert_called_once()
  for row, i in enumerate(indices):
    for key, value in source[i].items():
      np.testing.assert_array_equal(batched[key][row], value)


def test_stack_examples_nested_and_ragged():
  examples = [{"a": {"b": 1}, "c": [1, 2]}, {"a": {"b": 2}, "c": [3, 4]}]
  stacked = input_pipeline.stack_examples(examples)
  np.testing.assert_array_equal(stacked["a"]["b"], [1, 2])
  np.testing.assert_array_equal(stacked["c"], [[1, 2], [3, 4]])
  with pytest.raises(ValueError, match="Feature 'c' has different shapes"):
    input_pipeline.stack_examples([{"c": [1, 2]}, {"c": [1]}])


def _global_batch(source, process_count: int, step: int, **kwargs) -> dict:
  """Concatenation of every process's slice of the batch of `step`."""
  slices = [
      BatchLoader(source, process_index=p, process_count=process_count, **kwargs).batch(step)
      for p in range(process_count)
  ]
  return {key: np.concatenate([s[key] for s in slices]) for key in slices[0]}


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_global_batch_follows_the_documented_permutation(process_count):
  n, batch_size, seed = 37, 8, 3
  source = ListSource(n)
  steps_per_epoch = n // batch_size
  for step in range(3 * steps_per_epoch):
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n)
    expected = order[i * batch_size : (i + 1) * batch_size]
    batch = _global_batch(source, process_count, step, global_batch_size=batch_size, seed=seed)
    np.testing.assert_array_equal(batch["id"], expected)
    np.testing.assert_array_equal(batch["x"], np.stack([expected, -expected], axis=1))


def test_same_global_batch_for_any_process_count_on_digits(digits_test):
  source, _ = digits_test
  kwargs = dict(global_batch_size=16, seed=1, preprocess=input_pipeline.digits_preprocess)
  for step in (0, 7, 22, 23):  # 22 batches per epoch: steps 22 and 23 are in epoch 1.
    single = _global_batch(source, 1, step, **kwargs)
    for process_count in (2, 4):
      multi = _global_batch(source, process_count, step, **kwargs)
      for key in single:
        np.testing.assert_array_equal(multi[key], single[key])


def test_every_example_once_per_epoch_and_epochs_differ():
  n, batch_size = 40, 8
  loader = BatchLoader(ListSource(n), global_batch_size=batch_size, seed=0)
  assert loader.steps_per_epoch == 5
  epochs = [np.concatenate([loader.batch(e * 5 + i)["id"] for i in range(5)]) for e in range(3)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_remainder_of_each_epoch_is_dropped():
  loader = BatchLoader(ListSource(10), global_batch_size=4, seed=0)
  ids = np.concatenate([loader.batch(step)["id"] for step in range(2)])
  assert len(set(ids.tolist())) == 8
  assert loader.position(2) == {"step": 2, "epoch": 1, "batch_in_epoch": 0}


def test_resumed_loader_gives_the_same_batches():
  kwargs = dict(global_batch_size=6, seed=42, process_index=1, process_count=3)
  first = BatchLoader(ListSource(25), **kwargs)
  uninterrupted = [first.batch(step)["id"] for step in range(12)]
  resumed = BatchLoader(ListSource(25), **kwargs)
  for step in range(7, 12):
    np.testing.assert_array_equal(resumed.batch(step)["id"], uninterrupted[step])
  assert resumed.position(9) == {"step": 9, "epoch": 2, "batch_in_epoch": 1}
  with pytest.raises(ValueError, match="step must be >= 0"):
    resumed.batch(-1)


def test_without_shuffle_batches_are_in_source_order():
  loader = BatchLoader(ListSource(9), global_batch_size=3, seed=0, shuffle=False)
  np.testing.assert_array_equal(loader.batch(4)["id"], [3, 4, 5])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch_size=10, process_count=4), "multiple of the number of processes"),
        (dict(global_batch_size=0), "positive multiple"),
        (dict(global_batch_size=64), "larger than the dataset"),
        (dict(global_batch_size=8, process_index=2, process_count=2), "process_index must be in"),
        (dict(global_batch_size=8, seed=-1), "seed must be a non-negative"),
    ],
)
def test_bad_loader_arguments(kwargs, message):
  kwargs = {"seed": 0, **kwargs}
  with pytest.raises(ValueError, match=message):
    BatchLoader(ListSource(30), **kwargs)


# --- eval ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, batch_size, process_count", [(37, 8, 1), (37, 8, 2), (37, 8, 4), (5, 8, 4), (32, 8, 2)]
)
def test_eval_batches_cover_each_example_once(n, batch_size, process_count):
  source = ListSource(n)
  per_process = []
  for p in range(process_count):
    kwargs = dict(batch_size=batch_size, process_index=p, process_count=process_count)
    per_process.append(list(eval_batches(source, **kwargs)))
  num_batches = -(-n // batch_size)
  assert all(len(batches) == num_batches for batches in per_process)
  seen = []
  for batches in per_process:
    for batch in batches:
      assert batch["mask"].dtype == bool
      assert batch["id"].shape == batch["mask"].shape == (batch_size // process_count,)
      seen += batch["id"][batch["mask"]].tolist()
  assert sorted(seen) == list(range(n))


def test_eval_batches_on_digits_with_preprocess(digits_test):
  source, _ = digits_test
  batches = list(eval_batches(source, batch_size=64, preprocess=input_pipeline.digits_preprocess))
  assert [b["image"].shape for b in batches] == [(64, 8, 8, 1)] * 6
  assert sum(int(b["mask"].sum()) for b in batches) == 360
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, input_pipeline.fetch_batch(source, range(360))["label"])


def test_eval_batches_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    next(eval_batches(ListSource(10), batch_size=6, process_count=4))


# --- label noise -----------------------------------------------------------------------------


class LabelledSource(ListSource):
  """`ListSource` with a label: example `i` has label `i % 10`."""

  def __getitem__(self, i: int) -> dict:
    return {**super().__getitem__(i), "label": i % 10}


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4])
def test_label_noise_flips_exactly_the_stated_fraction_to_other_classes(fraction):
  clean = LabelledSource(500)
  noisy = input_pipeline.LabelNoiseSource(clean, fraction=fraction, num_classes=10, seed=3)
  before = input_pipeline.fetch_batch(clean, range(500))
  after = input_pipeline.fetch_batch(noisy, range(500))
  changed = after["label"] != before["label"]
  assert changed.sum() == round(fraction * 500)
  assert np.all((0 <= after["label"]) & (after["label"] < 10))
  np.testing.assert_array_equal(after["id"], before["id"])  # other features untouched
  # The same example keeps its noisy label however it is read (per item, in another order).
  assert [noisy[i]["label"] for i in (7, 3, 7)] == [after["label"][7], after["label"][3], after["label"][7]]


def test_label_noise_flips_are_spread_over_classes_and_seeded():
  clean = LabelledSource(2000)
  a = input_pipeline.LabelNoiseSource(clean, fraction=0.5, num_classes=10, seed=0)
  b = input_pipeline.LabelNoiseSource(clean, fraction=0.5, num_classes=10, seed=1)
  new = np.array([a[i]["label"] for i in a.flipped])
  counts = np.bincount(new, minlength=10)
  assert counts.min() > 0.5 * counts.mean()  # roughly uniform targets
  assert not np.array_equal(a.flipped, b.flipped)


def test_label_noise_config_knob_touches_only_the_wrapped_train_split(data_dir):
  import ml_collections  # pylint: disable=import-outside-toplevel

  train, info = get_data_source(DIGITS, "train", data_dir)
  test, _ = get_data_source(DIGITS, "test", data_dir)
  test_before = input_pipeline.fetch_batch(test, range(len(test)))["label"]
  noisy = input_pipeline.with_label_noise(train, info, ml_collections.ConfigDict({"label_noise": 0.3}), seed=0)
  labels = input_pipeline.fetch_batch(noisy, range(len(noisy)))["label"]
  clean = input_pipeline.fetch_batch(train, range(len(train)))["label"]
  assert (labels != clean).sum() == round(0.3 * len(train))
  np.testing.assert_array_equal(input_pipeline.fetch_batch(test, range(len(test)))["label"], test_before)
  assert input_pipeline.with_label_noise(train, info, ml_collections.ConfigDict({}), seed=0) is train


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_label_noise_rejects_fractions_outside_0_1(fraction):
  with pytest.raises(ValueError, match=r"must be a fraction in \[0, 1\)"):
    input_pipeline.LabelNoiseSource(LabelledSource(10), fraction=fraction, num_classes=10, seed=0)


def test_resolve_data_dir_prefers_the_argument_then_the_environment_then_home(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXPEFT_DATA_DIR", str(tmp_path / "env"))
  assert input_pipeline.resolve_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
  assert input_pipeline.resolve_data_dir("") == str(tmp_path / "env")
  monkeypatch.delenv("JAXPEFT_DATA_DIR")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert input_pipeline.resolve_data_dir() == str(tmp_path / "home" / "tensorflow_datasets")
