"""Builds the optimizer named in `config.optimizer`: a jaxpeft optimizer or any optax alias.

`config.optimizer` holds

* `name`: a factory of `jaxpeft.optim` or an optax alias taking `learning_rate` (adamw, sgd,
  adafactor, ...). Factories are found by name, so an optimizer added to `jaxpeft.optim` is usable
  here with all its arguments and no edit to the harness;
* `learning_rate`, `schedule` ('constant' | 'cosine'), `warmup_steps`, `grad_clip_norm`;
* the shared hyperparameters `b1, b2, b3, eps, weight_decay` (None: the factory's own default).
  Set ones must be arguments of the factory, except `weight_decay`: a factory without a
  `weight_decay` argument (sgd, adam, adafactor) gets it as L2 added to the gradient
  (`optax.add_decayed_weights` before the optimizer, like PyTorch's `weight_decay` of SGD/Adam), so
  one config works with every name;
* `kwargs`: any other argument of the factory by name (big_vision's `config.optax`), e.g.
  `--config.optimizer.kwargs.rho=0.1 --config.optimizer.kwargs.adaptive=True` for SAM. An argument
  the factory does not take is an error listing the ones it does.

Wrappers (factories with a `base_optimizer` argument: SAM, TRAM) take their base optimizer by name,
`kwargs.base_optimizer='adamw'` (default 'sgd'); the learning-rate schedule and the shared
hyperparameters then configure the base optimizer, and `kwargs` the wrapper.
"""

import inspect
from typing import Any, Callable

import ml_collections
import optax

import jaxpeft.optim
from jaxpeft.train.errors import UserError

SHARED_HPARAMS = ("b1", "b2", "b3", "eps", "weight_decay")
_DEFAULT_BASE = "sgd"


def _factory(name: str) -> Callable[..., optax.GradientTransformation]:
  for namespace in (jaxpeft.optim, optax):
    factory = getattr(namespace, name, None)
    if callable(factory) and "learning_rate" in inspect.signature(factory).parameters:
      return factory
  ours = sorted(
      n
      for n in getattr(jaxpeft.optim, "__all__", [])
      if callable(getattr(jaxpeft.optim, n))
      and "learning_rate" in inspect.signature(getattr(jaxpeft.optim, n)).parameters
  )
  raise UserError(
      f"Unknown optimizer {name!r}. Use a jaxpeft optimizer ({', '.join(ours)}) or an optax alias"
      " taking learning_rate (e.g. adam, adamw, sgd, lion, adafactor)."
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


def _arguments(factory) -> list[str]:
  return [p for p in inspect.signature(factory).parameters if p != "learning_rate"]


def _check_taken(name: str, factory, given: dict[str, Any], where: str) -> None:
  accepted = inspect.signature(factory).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
  unknown = [k for k in given if k not in accepted and not takes_any]
  if unknown:
    raise UserError(
        f"{where}.{unknown[0]}={given[unknown[0]]!r} is set, but optimizer {name!r} has no {unknown[0]!r}"
        f" argument. It takes: {', '.join(_arguments(factory))}. Leave it unset (None)."
    )


def _shared(opt_config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: opt_config.get(k) for k in SHARED_HPARAMS if opt_config.get(k) is not None}


def _plain(value: Any) -> Any:
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _leaf_optimizer(
    name: str, learning_rate: optax.ScalarOrSchedule, shared: dict[str, Any], kwargs: dict[str, Any], where: str
) -> optax.GradientTransformation:
  """`name`'s factory with the shared hyperparameters it takes and every kwarg (strictly)."""
  factory = _factory(name)
  accepted = inspect.signature(factory).parameters
  shared = dict(shared)
  weight_decay = shared.pop("weight_decay", None)
  _check_taken(name, factory, shared, "config.optimizer")
  _check_taken(name, factory, kwargs, where)
  l2 = None
  if weight_decay is not None and "weight_decay" in accepted:
    shared["weight_decay"] = weight_decay
  elif weight_decay:
    l2 = weight_decay
  tx = factory(learning_rate=learning_rate, **shared, **kwargs)
  return optax.chain(optax.add_decayed_weights(l2), tx) if l2 else tx


def _takes_base_factory(factory) -> bool:
  """Whether `factory`'s `base_optimizer` is a `learning_rate -> transformation` factory (its default is one)."""
  default = inspect.signature(factory).parameters["base_optimizer"].default
  return callable(default) and not isinstance(default, optax.GradientTransformation)


def build_optimizer(
    opt_config: ml_collections.ConfigDict, total_steps: int, *, clip: bool = True
) -> optax.GradientTransformation:
  """The optax transformation described by `config.optimizer`.

  `clip=False` leaves out the `grad_clip_norm` clipping, for a caller that clips the whole gradient tree itself
  before splitting it into optimizer groups (`jaxpeft.train.trainable.training_optimizer`).
  """
  learning_rate = learning_rate_schedule(opt_config, total_steps)
  kwargs = {k: _plain(v) for k, v in (opt_config.get("kwargs") or {}).items()}
  factory = _factory(opt_config.name)
  if "base_optimizer" in inspect.signature(factory).parameters:
    base_name = kwargs.pop("base_optimizer", None) or _DEFAULT_BASE
    if not isinstance(base_name, str):
      raise ValueError(
          f"config.optimizer.kwargs.base_optimizer={base_name!r}: give an optimizer name, e.g." " 'adamw'."
      )
    _check_taken(opt_config.name, factory, kwargs, "config.optimizer.kwargs")
    shared = _shared(opt_config)
    if _takes_base_factory(factory):  # e.g. LoRA+: builds its base from `learning_rate -> transformation`

      def base_factory(base_learning_rate, **base_kwargs):
        return _leaf_optimizer(base_name, base_learning_rate, shared, base_kwargs, "config.optimizer")

      tx = factory(learning_rate=learning_rate, base_optimizer=base_factory, **kwargs)
    else:  # e.g. SAM, TRAM: take a ready transformation, learning rate included
      base = _leaf_optimizer(base_name, learning_rate, shared, {}, "config.optimizer")
      tx = factory(learning_rate=None, base_optimizer=base, **kwargs)
  else:
    tx = _leaf_optimizer(opt_config.name, learning_rate, _shared(opt_config), kwargs, "config.optimizer.kwargs")
  if clip and opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx
