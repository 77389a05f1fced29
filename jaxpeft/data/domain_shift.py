"""Deterministic domain shifts of image batches, for "pretrain on a clean domain, adapt to a shifted one".

A shift is a fixed transform of every image (no randomness, so the shifted dataset is one fixed
dataset and eval is exact). It applies to preprocessed batches (`image` float32 in [0, 1] of shape
(batch, height, width, channels)):

===========  ====================================================  =========
shift        image                                                 geometric
===========  ====================================================  =========
'invert'     1 - image (white digits on black become black on      no
             white: every pixel's intensity changes)
'rotate90'   rotated 90 degrees counter-clockwise                  yes
'transpose'  height and width swapped (mirror on the diagonal)     yes
===========  ====================================================  =========

A geometric shift moves pixels, so it also moves a per-pixel `label` map (a label with axes
(batch, height, width), as the segmentation task has); a class label (batch,) is unchanged.
"""

from collections.abc import Callable

import numpy as np

Batch = dict[str, np.ndarray]

# name -> (transform of an array whose axes 1 and 2 are height and width, geometric?)
SHIFTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], bool]] = {
    "invert": (lambda x: 1.0 - x, False),
    "rotate90": (lambda x: np.rot90(x, k=1, axes=(1, 2)), True),
    "transpose": (lambda x: np.swapaxes(x, 1, 2), True),
}


def check_shift(shift: str) -> None:
  """Raises a clear error unless `shift` is '' (none) or a name in `SHIFTS`."""
  if shift and shift not in SHIFTS:
    raise ValueError(f"config.dataset.shift={shift!r}: use '' (no shift) or one of {sorted(SHIFTS)}.")


def apply_shift(batch: Batch, shift: str) -> Batch:
  """`batch` with `shift` applied to its `image` (and to a per-pixel `label` if geometric)."""
  check_shift(shift)
  if not shift:
    return batch
  transform, geometric = SHIFTS[shift]
  out = {**batch, "image": np.ascontiguousarray(transform(batch["image"]))}
  if geometric and batch["label"].ndim >= 3:
    out["label"] = np.ascontiguousarray(transform(batch["label"]))
  return out
