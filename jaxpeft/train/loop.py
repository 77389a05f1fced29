"""`train_and_evaluate(config, workdir)`: the training loop behind launch/train.py.

The loop builds the data loaders, model, optimizer and a sharded TrainState; resumes from the
latest checkpoint in `<workdir>/checkpoints` if there is one; then runs the jitted (or
pmapped) train step, logging every `config.log_every` steps, evaluating every
`config.eval_every` steps, checkpointing every `config.checkpoint.every_steps` steps and at the
end. A SIGTERM (or a JAX preemption notice) saves a checkpoint at the current step and returns.
Because the input batch of step `s` and the step's randomness depend only on `s`, a resumed run
continues bit for bit as if it had never stopped.

`config.sharding.steps_per_call=K` (jit only) runs K steps per compiled call (`make_multi_step`, a scan over
K stacked batches): the same updates bit for bit, fewer per-call overheads. Every interval above, the
re-selection interval and `num_train_steps` must then be multiples of K, and so is every saved step.

`config.sharding.model_parallel=N` (jit only) trains on a (devices/N) x N `data` x `model` mesh, the state laid out
by the model's tensor-parallel rules (jaxpeft/train/sharding.py); checkpoints restore onto any such mesh.

Safety: the config is validated first (`validate_config`); the run holds an flock on `<workdir>/.lock`
(a second run on the workdir fails at once); the updated trainable params and optimizer state are
checked for NaN/Inf before every save (`check_state_finite`), so no checkpoint holds a non-finite
value; a damaged newest checkpoint is set aside and the newest restorable one resumed
(`Checkpointer.restore_latest`); a full disk is reported once, naming the workdir (`DiskFullError`).

`config.dataset.label_noise` flips that fraction of the training labels (after `config.dataset.classes`
selects and relabels classes, among those); evaluation labels stay clean.

Adapter methods with more than a train step (hooks of `jaxpeft.train.trainable`):

* a calibrated init reads `config.adapter.calibration_batches` batches of the training split
  (the first batches of the run's order, the same on every process) before a fresh run; its residual
  base is frozen and saved once in `checkpoints/frozen/`, so a resumed run restores it and never
  recalibrates;
* a re-selection (every `config.adapter.reselect_every` steps) runs
  between two steps, before that step's checkpoint and eval. It rewrites the frozen base, so such runs
  save the frozen params inside every numbered checkpoint (and none in `checkpoints/frozen/`).
"""

import contextlib
import fcntl
import json
import math
import os
import signal
import tempfile
import threading
import time
from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxpeft.data import input_pipeline
from jaxpeft.models.registry import build_model
from jaxpeft.train import causal_lm, sharding
from jaxpeft.adapters.partition import param_count
from jaxpeft.train.checkpoint import Checkpointer
from jaxpeft.train.errors import DiskFullError, UserError, WorkdirBusyError, is_disk_full
from jaxpeft.train.export import export, record_base_checksum
from jaxpeft.train.metrics import MetricWriter, NonFiniteLossError, check_finite
from jaxpeft.train.pretrained import load_params
from jaxpeft.train.quantized_base import frozen_footprint, num_params
from jaxpeft.train.state import TrainState
from jaxpeft.train.step import make_eval_step, make_multi_step, make_reselect_step, make_train_step, objective
from jaxpeft.train.trainable import Trainable, training_optimizer

PMAP_AXIS = "devices"


class _StopRequest:
  """Remembers a SIGTERM until the loop reaches a step boundary where it can save."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(
        f"--workdir={workdir!r} is not a writable directory ({e.strerror}). Pass a directory you"
        " can write to; checkpoints, metrics and TensorBoard files go there."
    ) from e


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Holds an exclusive flock on `<workdir>/.lock` for the run (process 0 of a multi-process job).

  The kernel drops the lock when the process ends, however it ends, so a killed run never leaves
  the workdir locked.
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, ".lock")
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise WorkdirBusyError(
          f"--workdir={workdir} is in use by another run ({holder}). Wait for it to finish, or pass"
          " another --workdir; two runs on one workdir would overwrite each other's checkpoints."
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects values that would make a run do nonsense, with a one-line message each."""
  checks = [
      ("num_train_steps", config.num_train_steps, lambda v: isinstance(v, int) and v > 0, "a positive integer"),
      ("batch_size", config.batch_size, lambda v: isinstance(v, int) and v > 0, "a positive integer"),
      ("log_every", config.log_every, lambda v: isinstance(v, int) and v > 0, "a positive integer"),
      ("eval_every", config.eval_every, lambda v: isinstance(v, int) and v >= 0, "0 (off) or a positive integer"),
      (
          "checkpoint.every_steps",
          config.checkpoint.every_steps,
          lambda v: isinstance(v, int) and v > 0,
          "a positive integer (saves also happen at the end)",
      ),
      (
          "checkpoint.max_to_keep",
          config.checkpoint.max_to_keep,
          lambda v: isinstance(v, int) and v > 0,
          "a positive integer",
      ),
      (
          "optimizer.learning_rate",
          config.optimizer.learning_rate,
          lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
          "a positive finite number",
      ),
      (
          "optimizer.warmup_steps",
          config.optimizer.warmup_steps,
          lambda v: isinstance(v, int) and v >= 0,
          "a non-negative integer",
      ),
  ]
  for key, value, ok, expected in checks:
    if not ok(value):
      raise UserError(f"config.{key}={value!r}: expected {expected}.")
  _check_steps_per_call(config)
  _check_model_parallel(config)


def _check_model_parallel(config: ml_collections.ConfigDict) -> None:
  """Tensor parallelism over `model_parallel` devices: a positive integer, jit only."""
  n = config.sharding.get("model_parallel", 1)
  if not isinstance(n, int) or n < 1:
    raise UserError(
        f"config.sharding.model_parallel={n!r}: expected a positive integer (1: no tensor parallelism)."
    )
  if n > 1 and config.sharding.parallelism != "jit":
    raise UserError(
        f"config.sharding.model_parallel={n} needs parallelism='jit' (pmap replicates the model on every"
        " device); set --config.sharding.parallelism=jit or model_parallel=1."
    )


def _check_steps_per_call(config: ml_collections.ConfigDict) -> None:
  """K steps per call: jit only, and every step-count interval a multiple of K (steps happen K at a time)."""
  k = config.sharding.get("steps_per_call", 1)
  if not isinstance(k, int) or k < 1:
    raise UserError(f"config.sharding.steps_per_call={k!r}: expected a positive integer.")
  if k > 1 and config.sharding.parallelism != "jit":
    raise UserError(f"config.sharding.steps_per_call={k} needs parallelism='jit'; use 1 with pmap.")
  intervals = {
      "num_train_steps": config.num_train_steps,
      "log_every": config.log_every,
      "eval_every": config.eval_every,
      "checkpoint.every_steps": config.checkpoint.every_steps,
      "adapter.reselect_every": config.get("adapter", {}).get("reselect_every", 0),
  }
  for key, value in intervals.items():
    if value % k:
      raise UserError(
          f"config.{key}={value} is not a multiple of config.sharding.steps_per_call={k}: steps run {k} per"
          f" compiled call, so set it to a multiple of {k} (e.g. {max(k, value // k * k)})."
      )


@jax.jit
def _first_non_finite(tree) -> jax.Array:
  """Index (in `jax.tree.leaves` order) of the first floating leaf holding a NaN or Inf, or -1."""
  flags = [
      jnp.logical_not(jnp.all(jnp.isfinite(x)))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  if not flags:
    return jnp.array(-1)
  flags = jnp.stack(flags)
  return jnp.where(jnp.any(flags), jnp.argmax(flags), -1)


def check_state_finite(state: TrainState, step: int, last_saved: int | None) -> None:
  """Raises NonFiniteLossError when a trainable leaf or the optimizer state holds a NaN or Inf."""
  tree = {"params": state.params, "opt_state": state.opt_state}
  index = int(_first_non_finite(tree))
  if index < 0:
    return
  paths = [
      jax.tree_util.keystr(p)
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
      if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  kept = (
      f"the last checkpoint (step {last_saved}) is intact"
      if last_saved is not None
      else "no checkpoint was written"
  )
  raise NonFiniteLossError(
      f"Non-finite values in the updated state {paths[index]} by step {step}; not saved, {kept}. Lower"
      " the learning rate, enable --config.optimizer.grad_clip_norm, or check the input data."
  )


def _checked_mean(last_step: int, pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages the metrics of the steps ending at `last_step`, failing on any NaN or Inf."""
  host = jax.device_get(pending)
  for i, m in enumerate(host):
    check_finite(last_step - len(host) + 1 + i, {k: float(v) for k, v in m.items()})
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


class _Runner:
  """Holds the compiled steps for one parallelism mode ('jit' over a Mesh, or 'pmap')."""

  def __init__(self, config, trainable, tx, make_state, rng, abstract_base, mesh):
    input_keys = tuple(config.dataset.input_keys)
    self.mode = config.sharding.parallelism
    self.task = config.get("task", "classification")
    self.mesh = mesh
    self.steps_per_call = config.sharding.get("steps_per_call", 1)
    abstract = jax.eval_shape(make_state, rng, abstract_base)
    if self.mode == "jit":
      fsdp = config.sharding.fsdp
      layouts = sharding.parameter_layouts(
          trainable.model, abstract_base, abstract.params.get("adapter"), trainable.adapter, mesh, fsdp
      )
      self.shardings = sharding.state_shardings(abstract, mesh, fsdp, layouts)
      self.abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.shardings
      )
      self._init = jax.jit(make_state, out_shardings=self.shardings)
      batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
      train_step = make_train_step(trainable, tx, input_keys, task=self.task)
      stacked = self.steps_per_call > 1
      self._train = jax.jit(
          make_multi_step(train_step) if stacked else train_step,
          in_shardings=(self.shardings, sharding.batch_sharding(mesh, stacked)),
          out_shardings=(self.shardings, repl),
          donate_argnums=0,
      )
      self._eval = jax.jit(
          make_eval_step(trainable, input_keys, task=self.task), in_shardings=(self.shardings, batch_sh)
      )
      self._reselect = jax.jit(
          make_reselect_step(trainable, tx),
          in_shardings=(self.shardings,),
          out_shardings=self.shardings,
          donate_argnums=0,
      )
    elif self.mode == "pmap":
      if config.sharding.fsdp:
        raise ValueError("config.sharding.fsdp=True needs parallelism='jit'; pmap replicates state.")
      self.local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
      self.abstract = abstract
      self._init = jax.jit(make_state)
      self._train = jax.pmap(
          make_train_step(trainable, tx, input_keys, axis_name=PMAP_AXIS, task=self.task),
          axis_name=PMAP_AXIS,
          donate_argnums=0,
          devices=self.local_devices,
      )
      self._eval = jax.pmap(
          make_eval_step(trainable, input_keys, axis_name=PMAP_AXIS, task=self.task),
          axis_name=PMAP_AXIS,
          devices=self.local_devices,
      )
      self._reselect = jax.pmap(make_reselect_step(trainable, tx), donate_argnums=0, devices=self.local_devices)
    else:
      raise ValueError(f"config.sharding.parallelism={self.mode!r}: use 'jit' or 'pmap'.")

  def init(self, rng, base_params, calibration=None):
    return self.place(self._init(rng, base_params, calibration))

  def reselect(self, state):
    """The adapter method's re-selection between two steps (`make_reselect_step`)."""
    return self._reselect(state)

  def place(self, state):
    """A single-copy state as the step expects it (replicated over devices under pmap)."""
    return flax.jax_utils.replicate(state, self.local_devices) if self.mode == "pmap" else state

  def single_copy(self, state):
    return flax.jax_utils.unreplicate(state) if self.mode == "pmap" else state

  def _device_batch(self, local_batch):
    if self.mode == "pmap":
      n = len(self.local_devices)
      return jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), local_batch)
    return sharding.global_batch(local_batch, self.mesh)

  def train_steps(self, state, loader, step):
    """Runs the `steps_per_call` steps from `step` in one call; returns the state and each step's metrics."""
    k = self.steps_per_call
    if k > 1:
      batches = sharding.global_batch(loader.stacked_batches(step, k), self.mesh, stacked=True)
      state, metrics = self._train(state, batches)
      return state, [jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(k)]
    state, metrics = self._train(state, self._device_batch(loader.batch(step)))
    return state, [jax.tree.map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics]

  def eval_sums(self, state, local_batch):
    sums = self._eval(state, self._device_batch(local_batch))
    return jax.tree.map(lambda x: x[0], sums) if self.mode == "pmap" else sums


def evaluate(runner: _Runner, state: TrainState, config, source, preprocess) -> dict[str, float]:
  """The task's exact metrics over the whole evaluation split (`jaxpeft.train.step.objective`).

  Classification: loss and accuracy (per pixel for dense predictions, with `mean_iou`); causal LM:
  the response tokens' loss, perplexity and next-token accuracy.
  """
  totals = None
  for batch in input_pipeline.eval_batches(
      source,
      batch_size=config.eval_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      preprocess=preprocess,
  ):
    sums = runner.eval_sums(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return objective(runner.task).finalize_eval(jax.device_get(totals))


@jax.jit
def _l1_norm_device(params):
  return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def _l1_norm(params) -> float:
  """Sum of |params|: a cheap fingerprint that every process can compare."""
  return float(_l1_norm_device(params))


def _json_safe(value: Any) -> Any:
  """`value` with every NaN or Inf float replaced by None (results.json stays valid JSON)."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _calibration_inputs(config, source, preprocess, input_keys) -> list[list[jax.Array]]:
  """The model inputs of the first `config.adapter.calibration_batches` training batches (global batches)."""
  count = config.adapter.get("calibration_batches", 0)
  if count < 1:
    raise ValueError(
        f"Adapter method {config.adapter.method!r} initialises from activations: set"
        f" config.adapter.calibration_batches to a positive number of training batches (e.g. 8),"
        f" got {count}."
    )
  # Every process reads the same global batches, so all of them compute the same residual base.
  loader = input_pipeline.BatchLoader(
      source, global_batch_size=config.batch_size, seed=config.seed, preprocess=preprocess
  )
  return [[jnp.asarray(batch[k]) for k in input_keys] for batch in map(loader.batch, range(count))]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics.

  Returns:
    A dict with the final `step`, the `eval` metrics, `preempted` (True when a SIGTERM or
    preemption notice stopped the run early, after saving a checkpoint), `params_l1` (sum of
    |params|, a fingerprint), `trainable_params` (scalars the optimizer updates),
    `total_params`, `steps_per_sec` (median over the log intervals after the first, which holds
    compilation), the export sizes (`params_bytes`,
    `adapter_bytes`) and the final TrainState as `state`.
  """
  validate_config(config)
  _check_workdir(workdir)
  with _workdir_lock(workdir):
    try:
      return _train_and_evaluate(config, workdir)
    except Exception as e:  # pylint: disable=broad-except  (library errors wrap the OSError)
      if is_disk_full(e):
        raise DiskFullError(
            f"No space left on the device of --workdir={os.path.abspath(workdir)}. Free space"
            " there (or pass another --workdir) and rerun: the run resumes from its last"
            " complete checkpoint."
        ) from e
      raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`train_and_evaluate` once the config is validated and the workdir locked."""
  devices = jax.devices()
  if config.sharding.num_devices:
    if jax.process_count() > 1 or config.sharding.num_devices > len(devices):
      raise ValueError(
          f"config.sharding.num_devices={config.sharding.num_devices}: this job has"
          f" {len(devices)} devices in {jax.process_count()} process(es); use 0 (all)."
      )
    devices = devices[: config.sharding.num_devices]
  mesh = sharding.make_mesh(devices, config.sharding.get("model_parallel", 1))
  sharding.check_batch_size(config.batch_size, mesh)
  if config.eval_batch_size % mesh.shape[sharding.DATA_AXIS]:
    raise ValueError(
        f"config.eval_batch_size={config.eval_batch_size} is not divisible by the"
        f" {mesh.shape[sharding.DATA_AXIS]} data-parallel devices."
    )
  data_dir = input_pipeline.resolve_data_dir(config.dataset.data_dir)
  train_source, info = input_pipeline.get_data_source(config.dataset.name, config.dataset.train_split, data_dir)
  eval_source, _ = input_pipeline.get_data_source(config.dataset.name, config.dataset.eval_split, data_dir)
  train_source = input_pipeline.with_label_noise(
      input_pipeline.select_classes(train_source, config.dataset), info, config.dataset, config.seed
  )
  eval_source = input_pipeline.select_classes(eval_source, config.dataset)
  preprocess = input_pipeline.get_preprocess(config.dataset.name, config.dataset)
  # Packed rows (causal LM, config.dataset.packing) are for training; evaluation scores one example per row.
  unpacked = config.dataset.copy_and_resolve_references()
  if "packing" in unpacked:
    unpacked.packing = 0
  eval_preprocess = input_pipeline.get_preprocess(config.dataset.name, unpacked)
  loader = input_pipeline.BatchLoader(
      train_source,
      global_batch_size=config.batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      preprocess=preprocess,
  )

  model = build_model(config.model)
  trainable = Trainable.from_config(model, config)
  tx = training_optimizer(trainable, config)
  example = loader.batch(0)
  example_inputs = [jnp.asarray(example[k][:1]) for k in config.dataset.input_keys]
  base_rng, adapter_rng, state_rng = jax.random.split(jax.random.key(config.seed), 3)

  collections = set(jax.eval_shape(model.init, base_rng, *example_inputs)) - {"params"}

  def make_state(rng, base_params, calibration=None):
    params, frozen = trainable.split(rng, base_params, calibration)
    # Mutable collections (BatchNorm's batch_stats) start from their fresh init.
    model_state = {k: v for k, v in model.init(base_rng, *example_inputs).items() if k in collections}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=tx.init(params),
        rng=state_rng,
        model_state=model_state,
    )

  def base_params():
    fresh = jax.jit(model.init)(base_rng, *example_inputs)["params"]
    if not config.init_from.params:
      return fresh
    return load_params(config.init_from.params, fresh, config.init_from.keep_fresh)

  abstract_base = jax.eval_shape(lambda: model.init(base_rng, *example_inputs)["params"])
  runner = _Runner(config, trainable, tx, make_state, adapter_rng, abstract_base, mesh)
  checkpointer = Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.checkpoint.max_to_keep,
      async_save=config.checkpoint.async_save,
  )
  # A run that rewrites its base keeps the frozen params in every numbered checkpoint.
  restored = checkpointer.restore_latest(
      runner.abstract if trainable.rewrites_base else runner.abstract.replace(frozen={})
  )
  if restored is None:
    base, calibration = base_params(), None
    if config.export:
      record_base_checksum(workdir, base)
    if trainable.needs_calibration:
      calibration = trainable.calibrate(
          base, _calibration_inputs(config, train_source, preprocess, config.dataset.input_keys)
      )
    state, start = runner.init(adapter_rng, base, calibration), 0
    if not trainable.rewrites_base:
      checkpointer.save_frozen(runner.single_copy(state).frozen)
  else:
    restored, meta = restored
    if int(meta["step"]) % runner.steps_per_call:
      raise UserError(
          f"The checkpoint in {checkpointer.directory} is at step {meta['step']}, not a multiple of"
          f" config.sharding.steps_per_call={runner.steps_per_call}; resume it with steps_per_call=1."
      )
    if not trainable.rewrites_base:
      restored = restored.replace(frozen=checkpointer.restore_frozen(runner.abstract.frozen))
    state, start = runner.place(restored), int(meta["step"])
    logging.info(
        "Resumed from %s at step %d (input position %s).", checkpointer.directory, start, meta["input_position"]
    )

  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = MetricWriter(workdir, config.num_train_steps, start, show_progress=config.progress_bar)

  last_saved = start if restored is not None else None

  def save(step):
    nonlocal last_saved
    check_state_finite(state, step, last_saved)
    last_saved = step
    saved = runner.single_copy(state)
    checkpointer.save(
        step,
        saved if trainable.rewrites_base else saved.replace(frozen={}),
        {"step": step, "input_position": loader.position(step)},
    )

  pending, step, preempted, last_log, rates = [], start, False, time.perf_counter(), []
  try:
    with _StopRequest() as stop:
      while step < config.num_train_steps:
        state, metrics = runner.train_steps(state, loader, step)
        pending.extend(metrics)
        step += len(metrics)
        if trainable.reselects_after(step) and step < config.num_train_steps:
          state = runner.reselect(state)
        stopping = stop.requested or checkpointer.reached_preemption(step)
        saving = step % config.checkpoint.every_steps == 0 or step == config.num_train_steps or stopping
        if pending and (step % config.log_every == 0 or saving):
          averaged = _checked_mean(step, pending)  # Waits for the steps, so the rate is real.
          now = time.perf_counter()
          averaged["steps_per_sec"] = len(pending) / (now - last_log)
          if step - len(pending) > start:  # The first interval of a run holds compilation.
            rates.append(averaged["steps_per_sec"])
          last_log = now
          writer.advance(len(pending))
          writer.write(step, "train", averaged)
          pending = []
        if saving:
          save(step)
        if config.eval_every and step % config.eval_every == 0 and step < config.num_train_steps:
          writer.write(step, "eval", evaluate(runner, state, config, eval_source, eval_preprocess))
        if stopping:
          preempted = True
          break
  except BaseException:
    # Finish the saves already started (they are good checkpoints); the error that stopped the run
    # is the one to report, so a second one from the same cause (a full disk) is only logged.
    try:
      checkpointer.wait()
      checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("While stopping, the checkpointer also failed: %s", str(e).splitlines()[0][:200])
    writer.close()
    raise
  checkpointer.wait()
  checkpointer.close()
  final = runner.single_copy(state)
  steps_per_sec = float(np.median(rates)) if rates else None  # None: no interval after compilation
  result = {
      "step": step,
      "preempted": preempted,
      "params_l1": _l1_norm(final.params),
      "trainable_params": trainable.num_trained(final.params),
      "total_params": param_count(final.params["base"]) + num_params(final.frozen),
      "steps_per_sec": steps_per_sec,
      **frozen_footprint(final.frozen, checkpointer.frozen_dir() if not trainable.rewrites_base else None),
  }
  if not preempted:
    result["eval"] = evaluate(runner, state, config, eval_source, eval_preprocess)
    if runner.task == "causal_lm" and config.get("generation_examples", 0):
      generation, result["samples"] = causal_lm.held_out_generation(
          model,
          trainable.merged(final.params, final.frozen, quantized_keep="float32"),
          eval_source,
          config.dataset.tokenizer,
          count=config.generation_examples,
          max_new_tokens=config.generation_max_new_tokens,
      )
      result["eval"].update(generation)
    writer.write(step, "eval", result["eval"])
    if config.export:
      result.update(export(workdir, trainable, final.params, final.frozen, final.model_state))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe(result), f, indent=2, allow_nan=False)
  writer.close()
  logging.info("Finished at step %d: %s", step, result)
  return {**result, "state": final}
