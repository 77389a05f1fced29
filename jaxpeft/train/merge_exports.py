"""Merging the exports of N runs (``launch/merge.py``): full parameter trees or adapter files.

Inputs are workdirs of ``launch.train`` runs. ``config.kind="params"`` merges their ``export/params``
(Orbax) with a ``jaxpeft.merging`` method against the base in ``config.base`` (the Orbax params the runs
started from); ``config.kind="adapter"`` merges their ``export/adapter.safetensors`` on the weight-space
updates (``jaxpeft.merging.lora_updates.combine``: linear or TIES) into one LoRA adapter. Each input's
``export/base_checksum.txt`` must match the base. Writes ``<workdir>/export/params`` (Orbax, the merged
model), for adapters ``<workdir>/export/adapter.safetensors`` and ``<workdir>/export/peft/`` (PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``, for ``PeftModel.from_pretrained``; module names
from ``jaxpeft.adapters.default_module_name``; ``config.export_peft=False`` skips it), and
``<workdir>/merge_summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from absl import logging

from jaxpeft import merging
from jaxpeft.adapters import reparam
from jaxpeft.adapters.checkpoint import load_adapter, save_adapter
from jaxpeft.adapters.peft_format import export_peft

PARAMS_METHODS = ("task_arithmetic", "ties", "dare", "linear")
ADAPTER_METHODS = ("linear", "ties")


def _inputs(config: ml_collections.ConfigDict) -> list[str]:
  workdirs = [w.strip() for w in config.inputs.split(",") if w.strip()]
  if len(workdirs) < 2:
    raise ValueError(f"config.inputs must name at least two workdirs (comma-separated), got {config.inputs!r}.")
  return workdirs


def _weights(config: ml_collections.ConfigDict, n: int) -> list[float]:
  weights = [float(w) for w in config.weights] if config.weights else [1.0] * n
  if len(weights) != n:
    raise ValueError(f"config.weights has {len(weights)} entries for {n} inputs: give one per input or none.")
  return weights


def _restore(path: str) -> Any:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No Orbax params at {path}: expected a launch.train export (export/params).")
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def _recorded_checksums(workdirs: list[str]) -> dict[str, str]:
  recorded = {}
  for workdir in workdirs:
    path = os.path.join(workdir, "export", "base_checksum.txt")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        recorded[workdir] = f.read().strip()
    else:
      logging.warning("%s has no export/base_checksum.txt: its base cannot be checked.", workdir)
  return recorded


def _merge_params(config: ml_collections.ConfigDict, base: Any, models: list[Any], weights: list[float]) -> Any:
  method = config.method
  if method == "task_arithmetic":
    fn = lambda b, ms: merging.task_arithmetic(b, ms, weights, scale=config.scale)
  elif method == "ties":
    fn = lambda b, ms: merging.ties(
        b,
        ms,
        weights,
        config.density,
        scale=config.scale,
        majority_sign_method=config.majority_sign_method,
        convention=config.convention,
    )
  elif method == "dare":
    fn = lambda b, ms: merging.dare(
        b,
        ms,
        weights,
        config.density,
        key=jax.random.key(config.seed),
        combination=config.dare_combination,
        scale=config.scale,
    )
  elif method == "linear":
    fn = lambda b, ms: merging.linear(ms, weights)
  else:
    raise ValueError(f"Unknown config.method {method!r} for kind='params'; expected one of {PARAMS_METHODS}.")
  return jax.jit(fn)(base, models)


def _save_params(workdir: str, params: Any) -> str:
  path = os.path.join(os.path.abspath(workdir), "export", "params")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()
  return path


def merge_workdirs(config: ml_collections.ConfigDict, workdir: str, show_progress: bool = True) -> dict[str, Any]:
  """Merges the exports of ``config.inputs`` into ``workdir``; returns the summary it also writes."""
  start = time.perf_counter()
  workdirs = _inputs(config)
  weights = _weights(config, len(workdirs))
  if config.kind not in ("params", "adapter"):
    raise ValueError(f"config.kind must be 'params' or 'adapter', got {config.kind!r}.")
  if not config.base and not (config.kind == "params" and config.method == "linear"):
    raise ValueError(
        "config.base must name the Orbax params the inputs were fine-tuned from (e.g. the "
        "pretraining run's export/params); only kind='params' with method='linear' needs none."
    )
  bar = tqdm.tqdm(total=len(workdirs) + 2, desc=f"merge ({config.method})", disable=not show_progress)
  base = _restore(config.base) if config.base else None
  recorded = _recorded_checksums(workdirs)
  if base is not None and config.check_base:
    merging.check_base(base, recorded)
  bar.update(1)
  os.makedirs(os.path.join(workdir, "export"), exist_ok=True)
  summary = {
      "kind": config.kind,
      "method": config.method,
      "inputs": workdirs,
      "weights": weights,
      "base": config.base,
      "base_checked": sorted(recorded) if base is not None and config.check_base else [],
  }
  if config.kind == "params":
    models = []
    for wd in workdirs:
      models.append(_restore(os.path.join(wd, "export", "params")))
      bar.update(1)
    merged = _merge_params(config, base, models, weights)
  else:
    if config.method not in ADAPTER_METHODS:
      raise ValueError(f"Unknown config.method {config.method!r} for kind='adapter'; expected {ADAPTER_METHODS}.")
    adapters = []
    for wd in workdirs:
      params, adapter_config = load_adapter(os.path.join(wd, "export", "adapter.safetensors"), base_params=base)
      adapters.append((adapter_config, params))
      bar.update(1)
    rank = (
        None
        if config.adapter_rank in ("", None)
        else ("max" if config.adapter_rank == "max" else int(config.adapter_rank))
    )
    adapter, adapter_config = merging.combine(
        base,
        adapters,
        weights,
        config.method,
        rank=rank,
        density=config.density if config.method == "ties" else None,
    )
    save_adapter(os.path.join(workdir, "export", "adapter.safetensors"), adapter, adapter_config)
    if config.export_peft:
      summary["peft_dir"] = os.path.join(os.path.abspath(workdir), "export", "peft")
      export_peft(summary["peft_dir"], adapter, adapter_config, base)
    merged = reparam.merge(base, adapter, adapter_config)
    summary["adapter_ranks"] = dict(adapter_config.rank_pattern)
  summary["params_dir"] = _save_params(workdir, merged)
  bar.update(1)
  bar.close()
  leaves = jax.tree_util.tree_leaves(merged)
  summary.update(
      num_leaves=len(leaves),
      num_params=int(sum(np.size(x) for x in leaves)),
      seconds=round(time.perf_counter() - start, 2),
  )
  with open(os.path.join(workdir, "merge_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  logging.info(
      "Merged %d %s exports with %s (weights %s) into %s: %d leaves, %d parameters.",
      len(workdirs),
      config.kind,
      config.method,
      weights,
      workdir,
      summary["num_leaves"],
      summary["num_params"],
  )
  return summary
