"""Errors in what the user gave the harness (config, workdir, disk), printed by launch/train.py as one line."""

import errno


class UserError(ValueError):
  """Bad input or environment: the message says what was wrong and what to do."""


class WorkdirBusyError(UserError):
  """Another run holds the workdir's lock."""


class DiskFullError(UserError, OSError):
  """The workdir's file system ran out of space."""


def is_disk_full(error: BaseException) -> bool:
  """True when `error` or an exception it was raised from is ENOSPC ('No space left on device')."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False
