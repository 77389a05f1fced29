"""Wording shared by the error messages of several packages (adapters, models).

Kept below both packages so that neither imports the other for it.
"""

from collections.abc import Sequence

MAX_LISTED = 20


def listed(names: Sequence[str]) -> str:
  """The first ``MAX_LISTED`` names, comma-separated, and how many more there are."""
  shown = ", ".join(names[:MAX_LISTED])
  return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")
