"""Range checks of optimizer hyperparameters, shared by the optimizers in this package.

Only hyperparameters given as Python numbers are checked: arrays and schedules pass unchecked,
since they may be traced (e.g. under ``optax.inject_hyperparams``) and have no value yet.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Interval:
  """The valid values ``low <= x < high`` (each end open or closed); ``high=inf``: ``x >= low``."""

  low: float
  high: float = math.inf
  low_open: bool = False
  high_open: bool = True

  def rejects(self, value: float) -> bool:
    if self.high == math.inf:  # a lower bound only (lets NaN through, like the plain `x < low`)
      return value <= self.low if self.low_open else value < self.low
    above_low = self.low < value if self.low_open else self.low <= value
    below_high = value < self.high if self.high_open else value <= self.high
    return not (above_low and below_high)

  def __str__(self) -> str:
    if self.high == math.inf:
      return f"{'>' if self.low_open else '>='} {self.low:g}"
    return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


DECAY_RATE = Interval(0.0, 1.0)  # [0, 1): betas of moving averages
NON_NEGATIVE = Interval(0.0)
POSITIVE = Interval(0.0, low_open=True)


def check_hyperparameters(optimizer: str, valid: Interval, /, hint: str = "", **values: object) -> None:
  """Raises a ValueError naming the first Python-number value outside `valid`.

  Args:
    optimizer: name that starts the message, e.g. ``"AdaBelief"``.
    valid: the allowed range.
    hint: appended to the message, e.g. the defaults to fall back on.
    **values: the hyperparameters to check, by name.
  """
  for name, value in values.items():
    if isinstance(value, (int, float)) and valid.rejects(value):
      message = f"{optimizer}: {name} must be {valid}, got {value}."
      raise ValueError(f"{message} {hint}" if hint else message)
