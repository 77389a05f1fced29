"""Starting a run from earlier weights: the merged params exported by another run.

`config.init_from.params` names an `<workdir>/export/params` directory written by a previous
run (e.g. a model pre-trained on other classes or another domain). Its leaves replace the fresh
initialisation, except leaves whose path fully matches `config.init_from.keep_fresh` (e.g. a
new classification head with another number of classes). Any other difference in structure or
shape is an error that lists it.
"""

import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxpeft.train.checkpoint import tree_diff

PyTree = Any


def load_params(path: str, fresh_params: PyTree, keep_fresh: str = "") -> PyTree:
  """`fresh_params` with every leaf not matching `keep_fresh` replaced by the one at `path`."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(
        f"config.init_from.params={path!r} is not a params checkpoint ({e}). Point it at the"
        " export/params directory of an earlier run."
    ) from e
  saved_tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
  saved = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(saved_tree, sep="/").items()}
  fresh = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(fresh_params, sep="/").items()}
  regex = re.compile(keep_fresh) if keep_fresh else None
  kept = {k for k in fresh if regex is not None and regex.fullmatch(k)}
  diff = tree_diff({k: v for k, v in saved.items() if k not in kept},
                   {k: v for k, v in fresh.items() if k not in kept})
  if diff:
    raise ValueError(
        f"The params at {path} do not fit this model:\n" + "\n".join(diff)
        + "\nSet config.init_from.keep_fresh to a regex of the leaves to initialise afresh."
    )
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree)
  loaded = traverse_util.flatten_dict(
      ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy)), sep="/"
  )
  flat = traverse_util.flatten_dict(fresh_params, sep="/")
  merged = {k: (v if k in kept else loaded[k].astype(v.dtype)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(merged, sep="/")
