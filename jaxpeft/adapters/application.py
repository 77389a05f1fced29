"""One entry point to run a model with an adapter: weight space or activation space, picked here.

    with application.applied(base_params, adapter_params, config, mode="reparam") as params:
        logits = model.apply({"params": params}, x)

* ``mode="reparam"``: ``params`` are the rebuilt weights ``reparam.apply(base, adapter)`` (weight space);
* ``mode="factored"``: ``params`` are the base weights and the method's ``branch`` is added to the targeted
  layers' activations (``jaxpeft.adapters.factored``, the ``W + s a b`` product never formed);
* adapters that add modules (``module_hooks.ModuleHookMethod``: Houlsby, AdaptFormer, prompts) always run
  through their module hooks, whatever the mode.

Callers (the harness) therefore never dispatch on the method or the mode themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax

from jaxpeft.adapters import factored, module_hooks, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import get_method

MODES = ("reparam", "factored")


def adds_modules(config: AdapterConfig) -> bool:
  """Whether the method adds modules to the forward pass (then it cannot be merged into the weights)."""
  return isinstance(get_method(config.method), module_hooks.ModuleHookMethod)


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(
        f"Adapter mode {mode!r}: use one of {MODES} ('reparam' rebuilds the weights, 'factored' "
        "adds the adapter branch to the layers' activations)."
    )


def model_params(base_params: Any, adapter_params: Any, config: AdapterConfig, mode: str = "reparam") -> Any:
  """The parameter tree the model consumes in ``mode`` (the adapter merged in for weight-space methods)."""
  check_mode(mode)
  if mode == "factored" or adds_modules(config):
    return base_params
  return reparam.apply(base_params, adapter_params, config)


@contextlib.contextmanager
def applied(
    base_params: Any,
    adapter_params: Any,
    config: AdapterConfig,
    *,
    mode: str = "reparam",
    rng: jax.Array | None = None,
    deterministic: bool = True,
) -> Iterator[Any]:
  """Yields the parameters to call the model with; activation hooks are active inside the block.

  ``rng`` / ``deterministic`` drive the adapter-input dropout of the factored mode (see ``factored``).
  Use it inside the traced (jitted) function, like ``factored.intercept``.
  """
  params = model_params(base_params, adapter_params, config, mode)
  if adds_modules(config):
    hooks = module_hooks.intercept(params, adapter_params, config)
  elif mode == "factored":
    hooks = factored.intercept(params, adapter_params, config, rng=rng, deterministic=deterministic)
  else:
    hooks = contextlib.nullcontext()
  with hooks:
    yield params
