"""A checksum of a base model, recorded at export so a merge can refuse task vectors of another base.

    checksum = sha256 over the leaves in path order of (path, dtype, shape, bytes)

Used by ``jaxpeft.train.export`` (``export/base_checksum.txt``) and ``launch/merge.py``. Computing it reads
every leaf to the host once (process 0 of a multi-host run needs the addressable data of the whole tree).
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from jaxpeft.merging.trees import PyTree, leaf_path


def base_checksum(params: PyTree) -> str:
  """The hex sha256 of ``params`` (structure, dtypes, shapes and values)."""
  digest = hashlib.sha256()
  for kp, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: leaf_path(kv[0])):
    value = np.asarray(jax.device_get(leaf))
    digest.update(f"{leaf_path(kp)}|{value.dtype}|{value.shape}|".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def check_base(base: PyTree, recorded: dict[str, str]) -> None:
  """Raises unless ``base_checksum(base)`` equals every checksum in ``recorded`` (``{input name: checksum}``)."""
  actual = base_checksum(base)
  wrong = sorted(name for name, checksum in recorded.items() if checksum != actual)
  if wrong:
    raise ValueError(
        f"{wrong} were fine-tuned from a different base (base checksum {recorded[wrong[0]][:12]}... "
        f"recorded at export, this base has {actual[:12]}...): merge models of the same base."
    )
