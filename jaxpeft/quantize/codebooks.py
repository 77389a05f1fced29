"""The value tables (codebooks) of the quantized formats: NF4, symmetric int4, and bitsandbytes' 8-bit dynamic map.

A 4-bit format is a sorted table of 16 values in ``[-1, 1]``; a block of weights ``x`` with absmax ``a`` is stored
as the indices of the table entries nearest to ``x / a`` (``jaxpeft.quantize.blockwise``).

* **NF4** (NormalFloat4; Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, eq. 4 and
  appendix E): the normal-distribution quantiles ``q_i = Phi^-1(p_i)`` for 8 evenly spaced ``p_i`` in
  ``[0.5, 0.9677]`` (positive half) and 7 in ``[0.0323, 0.5]`` (negative half), merged with an exact zero and
  normalized to ``[-1, 1]``. The values are the published constants of the reference code
  (bitsandbytes ``create_normal_map(offset=0.9677083)``, also its NF4 lookup table), float32.
* **int4** (symmetric): ``k / 7`` for ``k = -7..7``, at indices ``k + 8``; index 0 (``-8/7``) is never produced
  (``|x / a| <= 1``), so the grid is symmetric with an exact zero. Not a bitsandbytes format.
* **dynamic8** (the signed 8-bit "dynamic tree" map; Dettmers, "8-Bit Approximations for Parallelism in Deep
  Learning", 2016): bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``, which
  QLoRA's double quantization uses for the block scales. For ``i = 0..6`` it holds ``+-10^(i-6) * m`` for the
  ``2^i`` midpoints ``m`` of ``linspace(0.1, 1, 2^i + 1)``, plus ``0`` and ``1``: 256 sorted float32 values
  (``-0.99297 .. 1``). Transcribed from the formula with the reference's float32 arithmetic (PyTorch's
  ``linspace`` runs from both ends with a float32 step), so the table equals the reference bit for bit.

The largest half-gap of each table bounds the per-element rounding error relative to the block absmax
(``half_gap``): NF4 ``0.1519`` (between -1 and -0.6962), int4 ``1/14``, dynamic8 ``0.00703``.
"""

from __future__ import annotations

import numpy as np

NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)

INT4 = (np.arange(16, dtype=np.float32) - 8) / np.float32(7)


def _linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
  """PyTorch's float32 ``linspace``: the first half counts up from ``start``, the second down from ``end``."""
  start, end = np.float32(start), np.float32(end)
  step = (end - start) / np.float32(steps - 1)
  i = np.arange(steps)
  return np.where(i < steps // 2, start + i * step, end - (steps - 1 - i) * step).astype(np.float32)


def _dynamic_map() -> np.ndarray:
  values = [0.0, 1.0]
  for i in range(7):
    bounds = _linspace_float32(0.1, 1.0, 2**i + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scaled = np.float32(10.0 ** (i - 6)) * means
    values += list(scaled) + list(-scaled)
  return np.sort(np.array(values, np.float32))


DYNAMIC8 = _dynamic_map()

FOUR_BIT = {"nf4": NF4, "int4": INT4}


def half_gap(table: np.ndarray) -> float:
  """The largest half-distance between neighbouring table values (the worst rounding error, relative to absmax)."""
  return float(np.max(np.diff(table)) / 2)
