r"""Reproduces the source papers' qualitative claims at small scale and writes a results table.

  python experiments/run.py --small                  # the whole set, about 20 minutes on 2 CPU cores
  python experiments/run.py --only=adopt,came        # a subset
  python -m experiments.run --workdir=workdir/claims  # the longer setting

Each claim is a module of experiments/claims/ with `run(small, workdir) -> rows` and its own plot
(`<workdir>/<name>.png`); its hyperparameters are an ml_collections `get_config(small)` at the top
of the module, next to the measurement and the verdict rule they belong to (these are not harness
jobs launched with `--config`, so they do not go in configs/). The script writes
`<workdir>/results.md`: claim | paper's statement | our measurement | reproduced?, where the
verdict is computed from the checks each module states in code (experiments/claims/results.py).
"""

import functools
import os
import sys

if __package__ in (None, ""):  # `python experiments/run.py`: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=wrong-import-position

from experiments import report  # pylint: disable=wrong-import-position
from experiments.claims.all_claims import CLAIMS  # pylint: disable=wrong-import-position
from experiments.claims.results import results_markdown  # pylint: disable=wrong-import-position

_SMALL = flags.DEFINE_bool("small", False, "Shorter runs (the whole set in about 20 minutes on 2 CPU cores).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/claims", "Directory for the runs, the plots and results.md.")
_ONLY = flags.DEFINE_list("only", list(CLAIMS), f"Claims to run, a subset of {list(CLAIMS)}.")


def main(argv):
  report.check_command_line(argv, "only", _ONLY.value, CLAIMS)
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  jobs = {name: functools.partial(CLAIMS[name].run, _SMALL.value, workdir) for name in _ONLY.value}
  claims, seconds = report.run_each(jobs)
  command = (
      "python experiments/run.py"
      + (" --small" if _SMALL.value else "")
      + (f" --only={','.join(_ONLY.value)}" if list(_ONLY.value) != list(CLAIMS) else "")
  )
  rows = [row for claim_rows in claims for row in claim_rows]
  report.write_report(os.path.join(workdir, "results.md"), results_markdown(rows, command, seconds))


if __name__ == "__main__":
  app.run(main)
