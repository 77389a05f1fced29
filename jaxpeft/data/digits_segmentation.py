"""A segmentation task derived from the digits: label every pixel with its digit (or background).

For a digit image `x` (intensities in [0, 1], pixel count / 16) of class `c`, the per-pixel label is

  y[h, w] = c + 1   if x[h, w] >= threshold      (foreground: a stroke of the digit)
  y[h, w] = 0       otherwise                    (background)

so a model classifies each pixel into 1 + num_classes classes; it must recognise the digit to
label its strokes. The task is the preprocess of the dataset name `jaxpeft_digits_segmentation`
(the `jaxpeft_digits` examples, see `jaxpeft.data.input_pipeline.DATASETS`); the threshold is
`config.dataset.foreground_threshold` (default 0.5, i.e. a pixel count of at least 8 of 16).
Labels come from the clean image; a domain shift (`config.dataset.shift`) is applied after, and a
geometric one moves the label map with the image.
"""

import numpy as np

Batch = dict[str, np.ndarray]

DEFAULT_THRESHOLD = 0.5


def segmentation_labels(image: np.ndarray, label: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """Per-pixel labels (batch, height, width) int32 of images (batch, height, width, 1) of class `label`."""
  if image.ndim != 4 or image.shape[-1] != 1:
    raise ValueError(
        f"segmentation_labels expects grey-scale images (batch, height, width, 1); got {image.shape}."
    )
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"foreground_threshold={threshold}: use a value in (0, 1] (intensities are in [0, 1]).")
  foreground = image[..., 0] >= threshold
  return np.where(foreground, label.astype(np.int32)[:, None, None] + 1, 0).astype(np.int32)


def segment(batch: Batch, threshold: float = DEFAULT_THRESHOLD) -> Batch:
  """A preprocessed classification batch (`image`, `label` (batch,)) with `label` made per-pixel."""
  return {**batch, "label": segmentation_labels(batch["image"], batch["label"], threshold)}
