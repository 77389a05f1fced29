"""TTA streams: order, resets, severities, mixed corruptions, Dirichlet-correlated labels."""

import numpy as np
import pytest

from jaxpeft.data import corruptions, tta_streams

IMAGES = np.random.default_rng(0).integers(0, 256, (12, 28, 28, 1)).astype(np.uint8)
LABELS = np.arange(12) % 3


def test_one_at_a_time_resets_per_corruption_and_continual_does_not():
  batches = list(tta_streams.one_at_a_time(IMAGES, LABELS, ["contrast", "jpeg"], 5, batch_size=4))
  assert [b["corruption"] for b in batches] == ["contrast"] * 3 + ["jpeg"] * 3
  assert [b["reset"] for b in batches] == [True, False, False] * 2
  first = batches[0]
  order = np.random.default_rng(0).permutation(12)[:4]
  expected = np.stack([corruptions.corrupt(IMAGES[i], "contrast", 5) for i in order]) / 255
  np.testing.assert_allclose(first["image"], expected.astype(np.float32))
  np.testing.assert_array_equal(first["label"], LABELS[order])
  cont = list(tta_streams.continual(IMAGES, LABELS, ["contrast", "jpeg"], 5, batch_size=4))
  assert [b["reset"] for b in cont] == [True] + [False] * 5


def test_gradual_severities_and_batch_size_one():
  batches = list(tta_streams.gradual(IMAGES, LABELS, ["brightness"], batch_size=12))
  assert [b["severity"] for b in batches] == list(tta_streams.GRADUAL_SEVERITIES)
  assert len(list(tta_streams.one_at_a_time(IMAGES, LABELS, ["jpeg"], batch_size=1))) == 12


def test_mixed_batches_hold_several_corruptions():
  names = ["brightness", "contrast", "gaussian_noise"]
  (batch,) = tta_streams.mixed(IMAGES, LABELS, names, 5, batch_size=12)
  which = np.random.default_rng(0).integers(3, size=12)
  order = np.random.default_rng(1).permutation(12)
  expected = np.stack([corruptions.corrupt(IMAGES[i], names[which[i]], 5) for i in order]) / 255
  np.testing.assert_allclose(batch["image"], expected.astype(np.float32))
  assert batch["corruption"] == "mixed" and len(set(which)) == 3


def test_dirichlet_order_is_a_permutation_with_runs_of_one_class():
  labels = np.repeat(np.arange(10), 50)
  order = tta_streams.dirichlet_order(labels, 0.01, seed=0)
  np.testing.assert_array_equal(np.sort(order), np.arange(500))
  switches = np.sum(labels[order][1:] != labels[order][:-1])
  shuffled = labels[np.random.default_rng(0).permutation(500)]
  iid = np.sum(shuffled[1:] != shuffled[:-1])
  assert switches < 60 < iid  # about one run per slot vs ~450 switches i.i.d.


def test_bad_stream_inputs():
  with pytest.raises(ValueError, match="Unknown corruption 'snow'"):
    list(tta_streams.continual(IMAGES, LABELS, ["snow"]))
  with pytest.raises(ValueError, match="batch_size=0"):
    list(tta_streams.continual(IMAGES, LABELS, ["jpeg"], batch_size=0))
  with pytest.raises(ValueError, match="concentration must be > 0"):
    tta_streams.dirichlet_order(LABELS, 0.0, 0)
