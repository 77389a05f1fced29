"""An on/off switch read from an environment variable: on unless set to '0'.

Shared by the process-wide settings that `import jaxpeft` applies (jaxpeft/cpu_heap.py) and by the
folded products of the models (jaxpeft/canonical_dot.py), so that both read their variable the
same way and refuse the same wrong values.
"""

import os


def on_unless_zero(name: str) -> bool:
  """Whether `$name` leaves the switch on: unset or '1' is on, '0' is off, anything else is an error."""
  value = os.environ.get(name, "")
  if value not in ("", "0", "1"):
    raise ValueError(f"{name}={value!r}: set it to '1' (on), '0' (off), or unset it (on).")
  return value != "0"
