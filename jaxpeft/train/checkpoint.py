"""Checkpointing of the train state with Orbax's CheckpointManager.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state` (the TrainState,
saved sharded by StandardSave, without its `frozen` params) and `meta` (JSON: the step and the
input position). The frozen params (a pretrained base under an adapter) never change, so they
are saved once per run, in `<workdir>/checkpoints/frozen/`. Orbax writes into a temporary directory and renames it when complete, so a save
that fails or is killed never replaces the last good checkpoint; old checkpoints are deleted
only after a newer one is finalised. A checkpoint that does not restore (a truncated array file, a
missing `_METADATA` or `meta`) is moved, never deleted, to `<workdir>/checkpoints_damaged/<step>`
and the run falls back to the newest one that restores, saying which and why. Restoring takes an abstract state that carries the
*current* shardings, so a checkpoint written on 8 devices restores onto 1 (or the reverse).
"""

import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from jaxpeft.train.errors import UserError

PyTree = Any


class IncompatibleCheckpointError(UserError):
  """The checkpoint's tree does not match the model being trained."""


class DamagedCheckpointError(UserError):
  """No checkpoint in the directory restores, or the frozen params it depends on are unreadable."""


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _shapes(tree: PyTree, is_leaf=None) -> dict[str, tuple[int, ...] | None]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  out = {}
  for path, leaf in leaves:
    typed_key = hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    out[_path_str(path)] = None if typed_key else tuple(leaf.shape)
  return out


def tree_diff(saved: dict[str, tuple | None], expected: dict[str, tuple | None]) -> list[str]:
  """Human-readable differences between two {path: shape} maps (None: shape not compared)."""
  lines = [f"  missing in checkpoint: {k} {expected[k]}" for k in sorted(expected.keys() - saved.keys())]
  lines += [f"  unexpected in checkpoint: {k} {saved[k]}" for k in sorted(saved.keys() - expected.keys())]
  for k in sorted(saved.keys() & expected.keys()):
    if None not in (saved[k], expected[k]) and saved[k] != expected[k]:
      lines.append(f"  shape mismatch at {k}: checkpoint {saved[k]} vs model {expected[k]}")
  return lines


def _remove_unfinished_saves(directory: str) -> None:
  """Deletes the `*.orbax-checkpoint-tmp*` folders that killed saves left in `directory`.

  Runs on process 0, and returns only when they are gone on every process. Orbax's manager can do
  this itself (`cleanup_tmp_directories`), but in a background thread that may still be running when
  `save_frozen` writes `frozen.orbax-checkpoint-tmp` beside the steps: it then deleted that save's
  files mid-write (NOT_FOUND from TensorStore, about 1 save in 12 on this machine).
  """
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in os.listdir(directory):
      if ocp.path.step.TMP_DIR_SUFFIX in name:
        shutil.rmtree(os.path.join(directory, name))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxpeft_remove_unfinished_saves")


class Checkpointer:
  """A thin wrapper around `ocp.CheckpointManager` for TrainStates.

  Args:
    directory: where the numbered checkpoints live.
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,  # done by _remove_unfinished_saves, before any save can start
    )
    _remove_unfinished_saves(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    """Starts saving `state` and `meta` as checkpoint `step` (the caller decides when)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._manager.save(step, args=args, force=True)

  def frozen_dir(self) -> str:
    return os.path.join(self.directory, "frozen")

  def save_frozen(self, frozen: PyTree) -> None:
    """Saves the never-trained parameters once per run (numbered checkpoints omit them)."""
    if not jax.tree.leaves(frozen):
      return
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(self.frozen_dir(), frozen, force=True)
    checkpointer.wait_until_finished()

  def restore_frozen(self, abstract_frozen: PyTree) -> PyTree:
    """The parameters written by `save_frozen`, onto the shardings of `abstract_frozen`.

    Raises:
      DamagedCheckpointError: `checkpoints/frozen/` is missing, unreadable or holds another tree.
    """
    if not jax.tree.leaves(abstract_frozen):
      return abstract_frozen
    checkpointer = ocp.StandardCheckpointer()
    advice = (
        f" Every numbered checkpoint in {self.directory} depends on this single copy. Restore"
        f" {self.frozen_dir()} from a backup, or start afresh in a new --workdir (the numbered"
        " checkpoints alone cannot rebuild it)."
    )
    try:
      saved = checkpointer.metadata(self.frozen_dir())
      saved_tree = getattr(getattr(saved, "item_metadata", saved), "tree", saved)
      diff = tree_diff(
          _shapes(saved_tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)),
          _shapes(abstract_frozen),
      )
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f"The frozen params in {self.frozen_dir()} are missing or damaged" f" ({_reason(e)}).{advice}"
      ) from e
    if diff:
      raise DamagedCheckpointError(
          f"The frozen params in {self.frozen_dir()} do not fit this model:\n" + "\n".join(diff) + f"\n{advice}"
      )
    try:
      return checkpointer.restore(self.frozen_dir(), abstract_frozen)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f"The frozen params in {self.frozen_dir()} are damaged ({_reason(e)}).{advice}"
      ) from e

  def _set_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `<workdir>/checkpoints_damaged/<step>[.<time>]`; returns where."""
    target = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged", str(step))
    if jax.process_index() == 0:
      if os.path.exists(target):
        target += f".{int(time.time())}"
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxpeft_set_aside_{step}")
    self._manager.reload()
    return target

  def restore_latest(self, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
    """The newest checkpoint that restores, or None when there is none.

    A checkpoint that fails to restore for a reason other than holding another model's tree is
    moved aside (see the module docstring) with a warning naming it and the reason, and the next
    older one is tried.

    Raises:
      IncompatibleCheckpointError: the newest readable checkpoint holds another model's tree.
      DamagedCheckpointError: there are checkpoints, but none restores.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = self.restore(step, abstract_state)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any library error means: unreadable)
        where = self._set_aside(step)
        failures.append(f"step {step} ({_reason(e)}; moved to {where})")
        logging.warning(
            "Checkpoint %s/%d does not restore (%s); moved it to %s and trying the next older one.",
            self.directory,
            step,
            _reason(e),
            where,
        )
        continue
      if failures:
        logging.warning(
            "Resuming from checkpoint %d, the newest that restores; damaged: %s.", step, "; ".join(failures)
        )
      return restored
    if failures:
      raise DamagedCheckpointError(
          f"No checkpoint in {self.directory} restores: "
          + "; ".join(failures)
          + ". They were kept, not deleted. Rerun to start from step 0 here, or use a new --workdir."
      )
    return None

  def reached_preemption(self, step: int) -> bool:
    """True when JAX's preemption service (TPU/multi-host) asks this job to stop at `step`."""
    return self._manager.reached_preemption(step)

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
    """Restores checkpoint `step` onto the shardings carried by `abstract_state`.

    Raises:
      IncompatibleCheckpointError: the saved tree differs from `abstract_state` (missing,
        unexpected or differently shaped leaves), listing every difference.
    """
    meta = self._manager.item_metadata(step)
    if meta.get("meta") is None and not os.path.isdir(os.path.join(self.directory, str(step), "meta")):
      raise DamagedCheckpointError(f"checkpoint {step} has no 'meta' item")
    saved = meta["state"]
    if saved is None:
      raise DamagedCheckpointError(f"checkpoint {step} has no readable 'state' item")
    saved_tree = getattr(saved, "tree", saved)
    diff = tree_diff(
        _shapes(saved_tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)),
        _shapes(abstract_state),
    )
    if diff:
      raise IncompatibleCheckpointError(
          f"Checkpoint {self.directory}/{step} was written by a different model or optimizer:\n"
          + "\n".join(diff)
          + "\nUse a fresh --workdir for a new model, or restore the config that wrote it."
      )
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    """Blocks until any asynchronous save has been written and finalised."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
