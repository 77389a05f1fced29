"""The XLA flags jaxpeft sets by default, in this one place (appended to `$XLA_FLAGS`, never overriding it).

* `--xla_cpu_copy_insertion_use_region_analysis=true`: XLA:CPU's copy insertion then proves that a
  donated buffer (optimizer state updated in place) is not read after it is overwritten, instead of
  copying whole leaves; measured 1.8-2.1x faster AdaBelief and ADOPT updates on the 2-core CPU (issue 20).
  It changes which buffers are copied, never a value.

XLA reads `$XLA_FLAGS` when JAX first creates a backend, so the flags apply when jaxpeft is imported before
the first computation (its package `__init__` calls `add_default_flags`). A flag the user already set in
`$XLA_FLAGS`, to any value, is left as the user wrote it.
"""

import os

DEFAULT_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def add_default_flags() -> None:
  """Appends each of `DEFAULT_FLAGS` that `$XLA_FLAGS` does not name already."""
  flags = os.environ.get("XLA_FLAGS", "")
  named = {f.split("=", 1)[0] for f in flags.split()}
  missing = [f for f in DEFAULT_FLAGS if f.split("=", 1)[0] not in named]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
