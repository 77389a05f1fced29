"""Builds the optimizer named in `config.optimizer`: a jaxpeft optimizer or any optax alias.

`config.optimizer` holds `name`, `learning_rate`, `schedule` ('constant' | 'cosine'),
`warmup_steps`, `grad_clip_norm` and the common hyperparameters `b1, b2, b3, eps,
weight_decay`; those left as None keep the optimizer's own default, and each optimizer receives
only the hyperparameters its factory takes (so `--config.optimizer.name=came` works with the
same config as `adamw`).
"""

import inspect

import ml_collections
import optax

import jaxpeft.optim

_COMMON_HPARAMS = ("b1", "b2", "b3", "eps", "weight_decay")


def _factory(name: str):
  for namespace in (jaxpeft.optim, optax):
    factory = getattr(namespace, name, None)
    if callable(factory) and "learning_rate" in inspect.signature(factory).parameters:
      return factory
  ours = sorted(getattr(jaxpeft.optim, "__all__", []))
  raise ValueError(
      f"Unknown optimizer {name!r}. Use a jaxpeft optimizer ({', '.join(ours)}) or an optax alias"
      " taking learning_rate (e.g. adam, adamw, sgd, lion)."
  )


def learning_rate_schedule(opt_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule: linear warm-up, then constant or cosine decay to zero."""
  lr, warmup = opt_config.learning_rate, opt_config.warmup_steps
  if opt_config.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
    )
  if opt_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
  raise ValueError(f"config.optimizer.schedule={opt_config.schedule!r}: use 'constant' or 'cosine'.")


def build_optimizer(opt_config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optax transformation described by `config.optimizer`."""
  factory = _factory(opt_config.name)
  accepted = inspect.signature(factory).parameters
  kwargs = {}
  for key in _COMMON_HPARAMS:
    value = opt_config.get(key)
    if value is None:
      continue
    if key not in accepted:
      raise ValueError(
          f"config.optimizer.{key}={value} is set, but optimizer {opt_config.name!r} has no {key!r}"
          f" hyperparameter (it takes: {', '.join(accepted)}). Leave it unset (None)."
      )
    kwargs[key] = value
  tx = factory(learning_rate=learning_rate_schedule(opt_config, total_steps), **kwargs)
  if opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx
