"""Houlsby (bottleneck) adapters, and the module-hook mechanism shared by module-adding adapters.

Paper: Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly, "Parameter-Efficient
Transfer Learning for NLP", ICML 2019, arXiv:1902.00751. Reference implementation followed:
google-research/adapter-bert (``modeling.py`` ``feedforward_adapter``).

Math (method ``"houlsby"``): a sequential bottleneck with its own residual, applied to the *output* ``h``
of a targeted linen ``Dense`` / ``DenseGeneral`` -- in the paper, the attention output projection and the
FFN output projection of every layer, before the sub-layer's residual add and LayerNorm::

    h' = h + act(h @ down + down_bias) @ up + up_bias,     down: (d, m),  up: (m, d),  m = config.rank

``d`` is the targeted kernel's (folded) output width. ``act`` is option ``activation``: ``"gelu"`` (default;
BERT's tanh approximation, as adapter-bert) or ``"relu"``. Init as adapter-bert: ``down`` and ``up`` from
a truncated normal with std 1e-3 (truncated at 2 std, like TensorFlow's), biases 0 -- a near-identity.
Parameters per adapter: ``2 m d + m + d``; the paper places ``2L`` of them and also trains the LayerNorms
and the task head (select those with your own trainable partition). Not mergeable (non-linear).

Usage: target the projection kernels and run the model inside ``intercept``::

    config = AdapterConfig(method="houlsby", targets=r".*(attention/out|mlp/fc2)/kernel", rank=64)
    adapter_params = reparam.init(rng, config, params)       # the same init / checkpoint machinery
    with houlsby.intercept(params, adapter_params, config):   # inside the jitted loss, like factored.intercept
        logits = model.apply({"params": params}, x)

Module hooks (``ModuleHookMethod`` + ``intercept``) are the activation-hook mechanism of adapters that add
modules (Houlsby, AdaptFormer, prompt tuning, VPT): like ``jaxpeft.adapters.factored``, a linen
``nn.intercept_methods`` interceptor that reads the adapter leaves from the same ``adapter_params`` tree
(keyed by the targeted leaf's path), but it wraps the *whole call* of a module -- the owner of the
targeted leaf, or the ancestor ``hook_levels_up`` levels above it -- so an adapter can read the module's
input, change it, or change its output. Limits: linen modules only, no stacked (``nn.scan``) targets,
and every hooked module must be called inside the block (checked on exit, as in ``factored``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, get_method, register_method, stop_frozen
from jaxpeft.adapters.reparam import AdapterParams, adapter_leaves
from jaxpeft.adapters.selection import select_targets

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}


class ModuleHookMethod(AdapterMethod):
    """Base of adapters that add modules to the forward pass; they run only inside ``intercept``.

    Subclasses set ``hook_levels_up`` (0: hook the module owning the targeted leaf; 1: its parent, ...)
    and implement ``hook``.
    """

    hook_levels_up: ClassVar[int] = 0

    def hook(self, call: Callable[..., Any], args: tuple, kwargs: dict, leaves: Leaves, target: Target,
             call_index: int) -> Any:
        """The hooked module's output. ``call(*args, **kwargs)`` runs the unmodified module.

        ``call_index`` is the position of this call among the hooked modules' calls of one forward pass: hooked
        calls inside the ``intercept`` block are counted from 0, modulo the number of hooked modules.
        """
        raise NotImplementedError

    def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        raise ValueError(f"{target.path}: {self.name!r} adds modules to the forward pass, so it cannot be applied "
                         "to (or merged into) the weights; run the model inside "
                         "jaxpeft.adapters.houlsby.intercept(params, adapter_params, config).")

    def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
        return self.apply(merged, leaves, target)

    def validate(self, target: Target) -> None:
        if target.dropout:
            raise ValueError(f"{target.path}: {self.name!r} has no adapter dropout; set AdapterConfig.dropout=0.")


def _module_path(target: Target, levels_up: int) -> str:
    owner = target.path.split("/")[:-1]
    if levels_up > len(owner):
        raise ValueError(f"{target.path}: the hooked module is {levels_up} level(s) above the leaf's owner, but "
                         "the path is not that deep; target a leaf of a submodule of the module to hook.")
    return "/".join(owner[: len(owner) - levels_up])


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
    stacked = [t.path for t in targets if t.stacked_axes]
    if stacked:
        raise ValueError(f"Stacked (scanned) targets {stacked} are not supported by module hooks.")
    by_path = adapter_leaves(adapter_params, targets)
    hooked: dict[str, Target] = {}
    for target in targets:
        module = _module_path(target, method.hook_levels_up)
        if module in hooked:
            raise ValueError(f"Targets {hooked[module].path!r} and {target.path!r} hook the same module "
                             f"{module!r}; narrow AdapterConfig.targets to one leaf per module.")
        hooked[module] = target
    calls: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        target = hooked.get("/".join(module.path))
        if target is None:
            return next_fun(*args, **kwargs)
        calls.append(target.path)
        return method.hook(next_fun, args, kwargs, stop_frozen(method, by_path[target.path]), target,
                           (len(calls) - 1) % len(hooked))

    with nn.intercept_methods(interceptor):
        yield
    missing = sorted({t.path for t in hooked.values()} - set(calls))
    if missing:
        raise ValueError(f"The modules owning {missing} were not called inside the intercept block (or a jit "
                         "cache hit skipped tracing: put the `with` inside the jitted function). Their adapters "
                         "were not applied.")


def bottleneck(h: jax.Array, leaves: Leaves, activation: str) -> jax.Array:
    """``act(h @ down + down_bias) @ up + up_bias`` in float32."""
    z = _ACTIVATIONS[activation](h.astype(jnp.float32) @ leaves["down"] + leaves["down_bias"])
    return z @ leaves["up"] + leaves["up_bias"]


def check_activation(target: Target) -> None:
    if target.option("activation") not in _ACTIVATIONS:
        raise ValueError(f"{target.path}: unknown activation {target.option('activation')!r}; expected one of "
                         f"{sorted(_ACTIVATIONS)}.")


def _features_last(y: jax.Array, target: Target) -> tuple[jax.Array, tuple[int, ...]]:
    """``y`` with the target's output axes folded to one trailing axis of width ``d_out``."""
    n_out = len(target.layer_shape) - target.fan_in_axes
    return y.reshape(y.shape[: y.ndim - n_out] + (target.matrix_shape[1],)), y.shape


@register_method("houlsby")
class Houlsby(ModuleHookMethod):
    """``h' = h + up(act(down(h)))`` on a targeted Dense's output. See the module docstring."""

    option_defaults = {"activation": "gelu"}

    def validate(self, target: Target) -> None:
        super().validate(target)
        check_activation(target)
        if target.fan_in_axes == 0:
            raise ValueError(f"{target.path}: Houlsby adapters target a projection kernel (whose output they "
                             f"adapt), got a leaf of per-layer shape {target.layer_shape}.")

    def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
        d, m = target.matrix_shape[1], target.rank
        key_down, key_up = jax.random.split(rng)
        init = jax.nn.initializers.truncated_normal(stddev=1e-3)
        return {"down": init(key_down, (d, m), jnp.float32), "down_bias": jnp.zeros((m,), jnp.float32),
                "up": init(key_up, (m, d), jnp.float32), "up_bias": jnp.zeros((d,), jnp.float32)}

    def hook(self, call, args, kwargs, leaves, target, call_index):
        y = call(*args, **kwargs)
        h, shape = _features_last(y, target)
        out = h.astype(jnp.float32) + bottleneck(h, leaves, target.option("activation"))
        return out.reshape(shape).astype(y.dtype)
