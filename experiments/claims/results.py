"""What a claim module returns: rows of the results table, the verdict rule, and plot saving.

A claim's verdict is decided in code from named boolean checks (each a qualitative statement of
the paper, measured): every check true -> 'yes', none -> 'no', some -> 'partly'.
"""

import dataclasses
import os
from collections.abc import Sequence

from matplotlib.figure import Figure

from experiments import report

PLOT_DPI = 80  # keeps each PNG well under 150 kB


@dataclasses.dataclass(frozen=True)
class ClaimRow:
  """One row of results.md: the paper's statement, what we measured, and the checks behind the verdict."""

  claim: str
  paper: str
  measurement: str
  checks: dict[str, bool]

  def __post_init__(self):
    if not self.checks:
      raise ValueError(f"Claim {self.claim!r} has no checks; a verdict needs at least one measured statement.")

  @property
  def verdict(self) -> str:
    passed = sum(self.checks.values())
    if passed == len(self.checks):
      return "yes"
    return "no" if passed == 0 else "partly"


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[ClaimRow]) -> str:
  """claim | paper's statement | our measurement | reproduced? (with the failed checks named)."""
  lines = ["| claim | paper's statement | our measurement | reproduced? |", "|---|---|---|---|"]
  for r in rows:
    failed = [name for name, ok in r.checks.items() if not ok]
    verdict = r.verdict + (f" (fails: {'; '.join(failed)})" if failed else "")
    lines.append(f"| {_cell(r.claim)} | {_cell(r.paper)} | {_cell(r.measurement)} | {_cell(verdict)} |")
  return "\n".join(lines)


def save_figure(fig: Figure, workdir: str, name: str) -> str:
  """Saves `fig` as `<workdir>/<name>.png` at PLOT_DPI, closes it, and returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, f"{name}.png")
  report.save_figure(fig, path, PLOT_DPI)
  return path


def results_markdown(rows: list[ClaimRow], command: str, seconds: dict[str, float]) -> str:
  """results.md: the command that produced it, the table, and each claim's wall time."""
  timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
  return (
      f"Produced by `{command}` (wall time: {timing}).\n\n" + markdown_table(rows) + "\n\n"
      "Verdicts are computed from the checks in experiments/claims/: yes = every check holds,"
      " partly = some, no = none; failed checks are named.\n"
  )
