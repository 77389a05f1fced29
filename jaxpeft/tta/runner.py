"""Runs a TTA method over a stream: configs from options, resets where the stream says, online error.

`make_config(method, apply_fn, num_classes, optimizer, options)` builds a method's `Config` (unknown
options are errors listing the ones it takes); `run(...)` steps it over `jaxpeft.data.tta_streams`
batches, re-initialising from the source model at every batch marked `reset`, and returns one record
per batch: `{"batch", "corruption", "severity", "error", "count"}` (error = fraction misclassified,
predictions made *before* the batch's update, as online TTA is scored), plus `backward` (images
back-propagated) for methods that count them.
"""

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.tta import METHODS, core


def method_module(method: str) -> Any:
  if method not in METHODS:
    raise ValueError(f"Unknown TTA method {method!r}; choose one of {', '.join(METHODS)}.")
  return METHODS[method]


def make_config(
    method: str,
    apply_fn: core.ApplyFn,
    num_classes: int,
    optimizer: optax.GradientTransformation | None,
    options: dict[str, Any],
) -> Any:
  """The method's `Config` with `apply_fn`, `num_classes` / `optimizer` where it takes them, and `options`."""
  module = method_module(method)
  fields = {f.name for f in dataclasses.fields(module.Config)}
  unknown = set(options) - fields
  if unknown:
    raise ValueError(
        f"TTA method {method!r} has no option(s) {sorted(unknown)}; it takes "
        f"{sorted(fields - {'apply_fn', 'num_classes', 'optimizer'})}."
    )
  kwargs = dict(options, apply_fn=apply_fn)
  if "num_classes" in fields:
    kwargs["num_classes"] = num_classes
  if "optimizer" in fields and optimizer is not None:
    kwargs["optimizer"] = optimizer
  return module.Config(**kwargs)


def run(
    method: str,
    config: Any,
    params: core.PyTree,
    model_state: core.PyTree,
    stream: Iterable[dict],
    clean_batches: Sequence[tuple[jax.Array, jax.Array]] = (),
    on_batch: Callable[[dict], None] | None = None,
) -> list[dict]:
  """Adapts over `stream`; returns the per-batch records (see the module docstring).

  `clean_batches`: labelled clean source batches `(images, labels)` for methods with a `prepare` (EATA's
  Fisher, RMT's prototypes, warm-up and replay, AdaNPC's memory, CAFA's class statistics).
  """
  module = method_module(method)
  init_kwargs = {}
  if hasattr(module, "prepare"):
    init_kwargs = module.prepare(params, model_state, config, list(clean_batches))
  step = jax.jit(module.step)
  state, records, backward = None, [], 0
  for i, batch in enumerate(stream):
    if state is None or batch["reset"]:
      state, backward = module.init(params, model_state, config, **init_kwargs), 0
    state, logits = step(state, jnp.asarray(batch["image"]))
    wrong = np.asarray(jnp.argmax(logits, -1)) != batch["label"]
    record = {
        "batch": i,
        "corruption": batch["corruption"],
        "severity": int(batch["severity"]),
        "error": float(wrong.mean()),
        "count": int(wrong.size),
    }
    if "num_backward" in state.extra:  # images back-propagated in this batch (EATA's filters)
      record["backward"] = int(state.extra["num_backward"]) - backward
      backward += record["backward"]
    records.append(record)
    if on_batch is not None:
      on_batch(record)
  return records


def error_by_corruption(records: list[dict]) -> dict[str, float]:
  """Error (fraction) per corruption over its records, weighted by batch size, and their mean as 'mean'."""
  totals: dict[str, list[float]] = {}
  for r in records:
    t = totals.setdefault(r["corruption"], [0.0, 0])
    t[0] += r["error"] * r["count"]
    t[1] += r["count"]
  errors = {k: wrong / n for k, (wrong, n) in totals.items()}
  errors["mean"] = float(np.mean(list(errors.values()))) if errors else float("nan")
  return errors
