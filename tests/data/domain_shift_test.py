"""Domain shifts: each transform against its numpy definition, applied to per-pixel labels only if geometric."""

import numpy as np
import pytest

from jaxpeft.data.domain_shift import apply_shift

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(size=(2, 4, 4, 1)).astype(np.float32)
MAPS = RNG.integers(0, 5, size=(2, 4, 4)).astype(np.int32)


def _rotate_ccw(x):  # per example: out[i, j] = x[j, W - 1 - i]
  return np.stack([[[e[j, e.shape[1] - 1 - i] for j in range(e.shape[0])] for i in range(e.shape[1])] for e in x])


@pytest.mark.parametrize(
    "shift, image_fn, geometric",
    [
        ("invert", lambda x: 1.0 - x, False),
        ("rotate90", _rotate_ccw, True),
        ("transpose", lambda x: np.stack([e.transpose(1, 0, *range(2, e.ndim)) for e in x]), True),
    ],
)
def test_shift_of_images_and_label_maps(shift, image_fn, geometric):
  out = apply_shift({"image": IMAGES, "label": MAPS}, shift)
  np.testing.assert_allclose(out["image"], image_fn(IMAGES), rtol=0, atol=1e-7)
  np.testing.assert_array_equal(out["label"], image_fn(MAPS) if geometric else MAPS)
  class_labels = np.array([1, 2])
  np.testing.assert_array_equal(
      apply_shift({"image": IMAGES, "label": class_labels}, shift)["label"], class_labels
  )


def test_no_shift_and_unknown_shift():
  batch = {"image": IMAGES, "label": MAPS}
  assert apply_shift(batch, "") is batch
  with pytest.raises(ValueError, match="config.dataset.shift='blur'"):
    apply_shift(batch, "blur")
