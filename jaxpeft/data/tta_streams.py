"""Test streams for test-time adaptation: the settings of the TTA papers, over corrupted images.

Every builder yields batches `{"image": float32 (b, h, w, 1) in [0, 1], "label": int32 (b,),
"corruption": str, "severity": int, "reset": bool}`; `reset` is True on the first batch after which a
method must restart from the source model (episodic-per-domain evaluation), False where it carries on.
`corruption` is "mixed" for batches whose images carry different corruptions. All randomness comes
from `seed`; images are corrupted by `jaxpeft.data.corruptions` (deterministic per image).

* `one_at_a_time` — each corruption alone, the method reset before each (Tent's and EATA's tables);
* `continual` — all corruptions in sequence, no reset (CoTTA, Wang et al. 2022);
* `gradual` — per corruption the severity goes 1, 2, 3, 4, 5, 4, 3, 2, 1 with no reset (RMT, Döbler et
  al. 2023, following CoTTA's gradual setting);
* `dirichlet_order` + any of the above with `order=` — labels temporally correlated: each class is
  spread over `num_slots` time slots by a Dirichlet(concentration) draw (LAME, Boudiaf et al. 2022;
  small concentration = long runs of one class);
* `mixed` — every image of a batch gets its own corruption (SAR's mixed shifts, Niu et al. 2023);
* batch size 1: any builder with `batch_size=1` (SAR).
"""

from collections.abc import Iterator, Sequence

import numpy as np

from jaxpeft.data import corruptions

StreamBatch = dict


def dirichlet_order(
    labels: np.ndarray, concentration: float, seed: int, num_slots: int | None = None
) -> np.ndarray:
  """A permutation of `range(len(labels))` with temporally correlated labels.

  Time is cut into `num_slots` slots (default: the number of classes); each class's examples (in a
  random order) are dealt to the slots in proportions drawn from Dirichlet(concentration * 1); within
  a slot the classes follow each other in a random order, and the slots are concatenated. A large
  concentration gives about `num_slots * classes` runs; a small one about one run per class.
  """
  if concentration <= 0:
    raise ValueError(
        f"Dirichlet concentration must be > 0 (e.g. 0.1 for strongly correlated labels), " f"got {concentration}."
    )
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  classes = np.unique(labels)
  num_slots = num_slots or len(classes)
  slots = [[] for _ in range(num_slots)]
  for c in rng.permutation(classes):
    members = rng.permutation(np.flatnonzero(labels == c))
    shares = rng.dirichlet(np.full(num_slots, float(concentration)))
    cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
    for slot, part in zip(slots, np.split(members, cuts)):
      slot.append(part)
  return np.concatenate([part for slot in slots for part in slot]).astype(np.int64)


def _batches(images, labels, order, corruption_of, severity_of, batch_size, name, severity, reset_first):
  for start in range(0, len(order) - batch_size + 1, batch_size):
    rows = order[start : start + batch_size]
    pictures = [corruptions.corrupt(images[i], corruption_of(i), severity_of(i)) for i in rows]
    yield {
        "image": np.stack(pictures).astype(np.float32) / 255,
        "label": labels[rows].astype(np.int32),
        "corruption": name,
        "severity": severity,
        "reset": bool(reset_first and start == 0),
    }


def _check(images, names: Sequence[str], severity: int, batch_size: int) -> None:
  for name in names:
    corruptions.check_corruption(name, severity)
  if batch_size < 1 or batch_size > len(images):
    raise ValueError(f"batch_size={batch_size} must be in [1, {len(images)}] (the number of test images).")


def _order(n: int, order: np.ndarray | None, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).permutation(n) if order is None else np.asarray(order)


def one_at_a_time(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    severity: int = 5,
    *,
    batch_size: int = 64,
    seed: int = 0,
    order: np.ndarray | None = None,
    reset: bool = True,
) -> Iterator[StreamBatch]:
  """Each corruption in `names` over all `images` (uint8 (n, h, w, 1)), reset before each when `reset`."""
  _check(images, names, severity, batch_size)
  for k, name in enumerate(names):
    rows = _order(len(images), order, seed + k)
    yield from _batches(
        images, labels, rows, lambda i, n=name: n, lambda i: severity, batch_size, name, severity, reset or k == 0
    )


def continual(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    severity: int = 5,
    *,
    batch_size: int = 64,
    seed: int = 0,
    order: np.ndarray | None = None,
) -> Iterator[StreamBatch]:
  """All corruptions in sequence, adapting without reset (CoTTA's continual setting)."""
  return one_at_a_time(images, labels, names, severity, batch_size=batch_size, seed=seed, order=order, reset=False)


GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def gradual(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    batch_size: int = 64,
    seed: int = 0,
    order: np.ndarray | None = None,
) -> Iterator[StreamBatch]:
  """Per corruption, severities 1..5..1, each over all `images`, no reset (RMT's gradual setting)."""
  _check(images, names, 1, batch_size)
  step = 0
  for name in names:
    for severity in GRADUAL_SEVERITIES:
      rows = _order(len(images), order, seed + step)
      yield from _batches(
          images, labels, rows, lambda i, n=name: n, lambda i, s=severity: s, batch_size, name, severity, step == 0
      )
      step += 1


def mixed(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    severity: int = 5,
    *,
    batch_size: int = 64,
    seed: int = 0,
    order: np.ndarray | None = None,
) -> Iterator[StreamBatch]:
  """Every image with a corruption drawn uniformly from `names` (one draw per image): mixed batches."""
  _check(images, names, severity, batch_size)
  which = np.random.default_rng(seed).integers(len(names), size=len(images))
  rows = _order(len(images), order, seed + 1)
  yield from _batches(
      images, labels, rows, lambda i: names[which[i]], lambda i: severity, batch_size, "mixed", severity, True
  )


SETTINGS = {"one_at_a_time": one_at_a_time, "continual": continual, "gradual": gradual, "mixed": mixed}
