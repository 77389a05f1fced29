"""Module hooks: the activation-hook mechanism of adapters that add modules to the forward pass.

Used by Houlsby adapters (``jaxpeft.adapters.methods.houlsby``), AdaptFormer (``adaptformer``), prompt tuning
(``prompt_tuning``) and visual prompt tuning (``vpt``). Like ``jaxpeft.adapters.factored``, ``intercept`` is a
linen ``nn.intercept_methods`` interceptor that reads the adapter leaves from the same ``adapter_params`` tree
(keyed by the targeted leaf's path), but it wraps the *whole call* of a module -- the owner of the targeted
leaf, or the ancestor ``hook_levels_up`` levels above it -- so an adapter (a ``ModuleHookMethod``) can read
the module's input, change it, or change its output::

    adapter_params = reparam.init(rng, config, params)            # the same init / checkpoint machinery
    with module_hooks.intercept(params, adapter_params, config):   # inside the jitted loss
        logits = model.apply({"params": params}, x)

Limits: linen modules only, no stacked (``nn.scan``) targets, and every hooked module must be called inside
the block (checked on exit, as in ``factored``).

Also here: ``bottleneck``, the ``act(h @ down + down_bias) @ up + up_bias`` block shared by the bottleneck
adapters (Houlsby, AdaptFormer), and ``check_activation`` for their ``activation`` option.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.adapters import interception
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, get_method, stop_frozen
from jaxpeft.adapters.reparam import AdapterParams, adapter_leaves
from jaxpeft.adapters.selection import select_targets

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class ModuleHookMethod(AdapterMethod):
  """Base of adapters that add modules to the forward pass; they run only inside ``intercept``.

  Subclasses set ``hook_levels_up`` (0: hook the module owning the targeted leaf; 1: its parent, ...)
  and implement ``hook``.
  """

  hook_levels_up: ClassVar[int] = 0

  def hook(
      self, call: Callable[..., Any], args: tuple, kwargs: dict, leaves: Leaves, target: Target, call_index: int
  ) -> Any:
    """The hooked module's output. ``call(*args, **kwargs)`` runs the unmodified module.

    ``call_index`` is the position of this call among the hooked modules' calls of one forward pass: hooked
    calls inside the ``intercept`` block are counted from 0, modulo the number of hooked modules.
    """
    raise NotImplementedError

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    raise ValueError(
        f"{target.path}: {self.name!r} adds modules to the forward pass, so it cannot be applied "
        "to (or merged into) the weights; run the model inside "
        "jaxpeft.adapters.module_hooks.intercept(params, adapter_params, config)."
    )

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return self.apply(merged, leaves, target)

  def check_module(self, module_params: Any, module_path: str, target: Target) -> None:
    """Refuses a hooked module the method cannot wrap; ``module_params`` is its parameter subtree."""

  def validate(self, target: Target) -> None:
    if target.dropout:
      raise ValueError(f"{target.path}: {self.name!r} has no adapter dropout; set AdapterConfig.dropout=0.")


def _subtree(params: Any, module_path: str) -> Any:
  for name in filter(None, module_path.split("/")):
    params = params[name]
  return params


@contextlib.contextmanager
def intercept(params: Any, adapter_params: AdapterParams, config: AdapterConfig) -> Iterator[None]:
  """Context manager running the module-adding adapter of ``config`` on the hooked linen modules.

  Args:
    params: the base linen ``variables['params']`` (used to resolve the targets).
    adapter_params: as created by ``reparam.init``.
    config: an ``AdapterConfig`` whose method is a ``ModuleHookMethod`` (houlsby, adaptformer,
      prompt_tuning, vpt).
  """
  method = get_method(config.method)
  if not isinstance(method, ModuleHookMethod):
    raise ValueError(f"Method {config.method!r} does not add modules; use reparam.apply or factored.intercept.")
  targets = select_targets(config, params)
  by_path = adapter_leaves(adapter_params, targets)
  hooked: dict[str, Target] = {}
  for target in targets:
    module = interception.module_path(target, method.hook_levels_up)
    if module in hooked:
      raise ValueError(
          f"Targets {hooked[module].path!r} and {target.path!r} hook the same module "
          f"{module!r}; narrow AdapterConfig.targets to one leaf per module."
      )
    hooked[module] = target
    method.check_module(_subtree(params, module), module, target)
  calls = 0

  def handler(next_fun, args, kwargs, module, target):
    nonlocal calls
    calls += 1
    return method.hook(
        next_fun, args, kwargs, stop_frozen(method, by_path[target.path]), target, (calls - 1) % len(hooked)
    )

  with interception.intercept(hooked, handler, "module hooks"):
    yield


def bottleneck(h: jax.Array, leaves: Leaves, activation: str) -> jax.Array:
  """``act(h @ down + down_bias) @ up + up_bias`` in float32."""
  z = _ACTIVATIONS[activation](h.astype(jnp.float32) @ leaves["down"] + leaves["down_bias"])
  return z @ leaves["up"] + leaves["up_bias"]


def check_activation(target: Target) -> None:
  if target.option("activation") not in _ACTIVATIONS:
    raise ValueError(
        f"{target.path}: unknown activation {target.option('activation')!r}; expected one of "
        f"{sorted(_ACTIVATIONS)}."
    )
