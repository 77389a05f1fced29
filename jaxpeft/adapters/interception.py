"""The one activation-interception engine: run a handler around the calls of the targeted linen modules.

Everything that acts on activations goes through ``intercept``: the factored LoRA-style branch
(``jaxpeft.adapters.factored``), module-adding adapters (``jaxpeft.adapters.module_hooks``), mixed-adapter
batches (``jaxpeft.adapters.mixed_batch``, via ``factored``) and calibration capture (CorDA's input
covariances). It owns what they share:

* target lookup: ``hooked`` maps a linen module path (``"encoder/layer_0/query"``, '/'-joined, ``""`` for
  the root) to the ``Target`` it serves; only ``__call__`` of a bound module found there reaches the handler;
* stacked (``nn.scan``) targets are refused (one module call serves all stacked layers there, so the
  per-layer adapter leaves cannot be picked);
* the check that every hooked module was called inside the block: a jit cache hit outside the block would
  otherwise silently skip the adapters.

``reparam`` (weight space) is separate; ``jaxpeft.adapters.application.applied`` picks between the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn

from jaxpeft.adapters.core import Target

# handler(call, args, kwargs, module, target) -> the module's output; call(*args, **kwargs) runs the module.
Handler = Callable[[Callable[..., Any], tuple, dict, nn.Module, Target], Any]


def module_path(target: Target, levels_up: int = 0) -> str:
  """The path of the module owning ``target``'s leaf, or of its ancestor ``levels_up`` levels above."""
  owner = target.path.split("/")[:-1]
  if levels_up > len(owner):
    raise ValueError(
        f"{target.path}: the hooked module is {levels_up} level(s) above the leaf's owner, but "
        "the path is not that deep; target a leaf of a submodule of the module to hook."
    )
  return "/".join(owner[: len(owner) - levels_up])


@contextlib.contextmanager
def intercept(hooked: Mapping[str, Target], handler: Handler, what: str) -> Iterator[None]:
  """Inside the block, each ``__call__`` of a module in ``hooked`` returns ``handler(...)``'s output.

  Args:
    hooked: ``{module path: target}``.
    handler: computes the hooked call's output (see ``Handler``).
    what: names the user of the engine in error messages (e.g. ``"the activation-hook mode"``).
  """
  stacked = sorted(t.path for t in hooked.values() if t.stacked_axes)
  if stacked:
    raise ValueError(
        f"Stacked (scanned) targets {stacked} are not supported by {what}; use reparam.apply "
        "or unstacked layers."
    )
  called: set[str] = set()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **kwargs)
    target = hooked.get("/".join(module.path))
    if target is None:
      return next_fun(*args, **kwargs)
    called.add(target.path)
    return handler(next_fun, args, kwargs, module, target)

  with nn.intercept_methods(interceptor):
    yield
  missing = sorted({t.path for t in hooked.values()} - called)
  if missing:
    raise ValueError(
        f"Targets {missing} were not called inside the intercept block ({what}), or a jit cache "
        "hit skipped tracing (put the `with` inside the jitted function); nothing was applied "
        "to them."
    )
