"""Adapter-only checkpoints: only the adapter leaves plus the ``AdapterConfig`` record.

Two formats, chosen by the path:

* ``*.safetensors``: one file; tensor keys are the '/'-joined adapter paths (``"encoder/query/kernel/a"``),
  the config JSON is stored in the file's metadata under ``"jaxpeft_adapter_config"``.
* anything else: an Orbax checkpoint directory with two items, ``adapter`` (the adapter pytree,
  ``StandardSave``) and ``config`` (the config dict, ``JsonSave``).

``load_adapter(path)`` returns ``(adapter_params, config)`` in a fresh process without needing the model.
Given ``base_params`` it also checks the adapter against the structure ``reparam.init`` would build for
that model and reports missing / unexpected / wrong-shape leaves in one readable message.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import safetensors
import safetensors.flax
from flax import traverse_util

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.reparam import AdapterParams, init_with_base

_CONFIG_KEY = "jaxpeft_adapter_config"


def _is_safetensors(path: str | os.PathLike) -> bool:
  return os.fspath(path).endswith(".safetensors")


def save_adapter(path: str | os.PathLike, adapter_params: AdapterParams, config: AdapterConfig) -> None:
  """Writes ``adapter_params`` and ``config`` to ``path`` (``*.safetensors`` file or Orbax directory)."""
  if _is_safetensors(path):
    flat = traverse_util.flatten_dict(adapter_params, sep="/")
    safetensors.flax.save_file(
        {k: jnp.asarray(v) for k, v in flat.items()},
        os.fspath(path),
        metadata={_CONFIG_KEY: config.to_json(), "format": "flax"},
    )
    return
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
        os.path.abspath(path),
        ocp.args.Composite(
            adapter=ocp.args.StandardSave(adapter_params), config=ocp.args.JsonSave(config.to_dict())
        ),
    )


def check_adapter(adapter_params: AdapterParams, config: AdapterConfig, base_params: Any) -> None:
  """Raises ``ValueError`` with a diff (missing / unexpected / wrong shape / wrong dtype leaves) if
  ``adapter_params`` does not fit ``config`` on ``base_params``."""
  _, expected = jax.eval_shape(lambda p: init_with_base(jax.random.key(0), config, p), base_params)
  want = traverse_util.flatten_dict(expected, sep="/")
  got = traverse_util.flatten_dict(adapter_params, sep="/")
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = [
      f"{k}: expected {tuple(want[k].shape)}, got {tuple(got[k].shape)}"
      for k in sorted(set(want) & set(got))
      if tuple(want[k].shape) != tuple(got[k].shape)
  ]
  wrong_dtype = [
      f"{k}: expected {jnp.dtype(want[k].dtype).name}, got {jnp.dtype(got[k].dtype).name}"
      for k in sorted(set(want) & set(got))
      if jnp.dtype(want[k].dtype) != jnp.dtype(got[k].dtype)
  ]
  if missing or unexpected or wrong or wrong_dtype:
    raise ValueError(
        "Adapter does not fit this model and config:\n"
        f"  missing: {missing}\n  unexpected: {unexpected}\n  wrong shape: {wrong}\n"
        f"  wrong dtype: {wrong_dtype}"
    )


def load_adapter(path: str | os.PathLike, base_params: Any = None) -> tuple[AdapterParams, AdapterConfig]:
  """Reads ``(adapter_params, config)`` written by ``save_adapter``; validates against ``base_params`` if given."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No adapter checkpoint at {os.fspath(path)!r}.")
  if _is_safetensors(path):
    with safetensors.safe_open(os.fspath(path), framework="flax") as f:
      metadata = f.metadata() or {}
    if _CONFIG_KEY not in metadata:
      raise ValueError(
          f"{os.fspath(path)!r} has no {_CONFIG_KEY!r} metadata: it was not written by "
          "jaxpeft's save_adapter (PEFT files need the PEFT importer)."
      )
    config = AdapterConfig.from_json(metadata[_CONFIG_KEY])
    adapter = traverse_util.unflatten_dict(safetensors.flax.load_file(os.fspath(path)), sep="/")
  else:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(
          os.path.abspath(path),
          ocp.args.Composite(adapter=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()),
      )
    config = AdapterConfig.from_dict(restored["config"])
    adapter = restored["adapter"]
  if base_params is not None:
    check_adapter(adapter, config, base_params)
  return adapter, config
