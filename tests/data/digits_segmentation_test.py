"""Digits segmentation labels against a per-pixel numpy recomputation from load_digits()."""

import ml_collections
import numpy as np
import pytest
import sklearn.datasets

from jaxpeft.data import input_pipeline
from jaxpeft.data.digits_segmentation import segmentation_labels


@pytest.fixture(scope="module")
def raw_batch():
  digits = sklearn.datasets.load_digits()
  rows = np.arange(0, 1797, 97)
  return {
      "image": digits.images[rows].astype(np.uint8)[..., None],
      "label": digits.target[rows],
      "index": rows.astype(np.int32),
  }


def _expected(images, labels, threshold):
  out = np.zeros(images.shape[:3], np.int32)
  for n in range(images.shape[0]):
    for h in range(images.shape[1]):
      for w in range(images.shape[2]):
        if images[n, h, w, 0] / 16.0 >= threshold:
          out[n, h, w] = labels[n] + 1
  return out


@pytest.mark.parametrize("threshold, shift", [(0.5, ""), (0.25, ""), (0.5, "invert"), (0.5, "rotate90")])
def test_preprocess_labels_every_pixel(raw_batch, threshold, shift):
  config = ml_collections.ConfigDict({"shift": shift, "foreground_threshold": threshold})
  batch = input_pipeline.get_preprocess("jaxpeft_digits_segmentation", config)(raw_batch)
  images = raw_batch["image"].astype(np.float64)
  expected_labels = _expected(images, raw_batch["label"], threshold)
  expected_images = images / 16.0
  if shift == "invert":
    expected_images = 1.0 - expected_images
  if shift == "rotate90":  # labels come from the clean image and move with it
    expected_images = np.rot90(expected_images, axes=(1, 2))
    expected_labels = np.rot90(expected_labels, axes=(1, 2))
  np.testing.assert_array_equal(batch["label"], expected_labels)
  np.testing.assert_allclose(batch["image"], expected_images, atol=1e-6)
  assert batch["label"].dtype == np.int32 and set(np.unique(batch["label"])) > {0}


def test_digits_preprocess_applies_the_shift_and_bad_inputs_are_refused(raw_batch):
  shifted = input_pipeline.get_preprocess("jaxpeft_digits", ml_collections.ConfigDict({"shift": "invert"}))(
      raw_batch
  )
  np.testing.assert_allclose(shifted["image"], 1.0 - raw_batch["image"] / 16.0, atol=1e-6)
  with pytest.raises(ValueError, match="foreground_threshold"):
    segmentation_labels(raw_batch["image"] / 16.0, raw_batch["label"], threshold=0.0)
  with pytest.raises(ValueError, match="config.dataset.shift"):
    input_pipeline.get_preprocess("jaxpeft_digits", ml_collections.ConfigDict({"shift": "blur"}))
