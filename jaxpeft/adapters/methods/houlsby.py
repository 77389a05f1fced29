"""Houlsby (bottleneck) adapters: a sequential bottleneck after a projection, with its own residual.

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

Usage: target the projection kernels and run the model inside the module-hook interceptor
(``jaxpeft.adapters.module_hooks``)::

    config = AdapterConfig(method="houlsby", targets=r".*(attention/out|mlp/fc2)/kernel", rank=64)
    adapter_params = reparam.init(rng, config, params)            # the same init / checkpoint machinery
    with module_hooks.intercept(params, adapter_params, config):   # inside the jitted loss
        logits = model.apply({"params": params}, x)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.module_hooks import ModuleHookMethod, bottleneck, check_activation


def _features_last(y: jax.Array, target: Target) -> tuple[jax.Array, tuple[int, ...]]:
  """``y`` with the target's output axes folded to one trailing axis of width ``d_out``."""
  n_out = len(target.layer_shape) - target.fan_in_axes
  return y.reshape(y.shape[: y.ndim - n_out] + (target.matrix_shape[1],)), y.shape


@register_method("houlsby")
class Houlsby(ModuleHookMethod):
  """``h' = h + up(act(down(h)))`` on a targeted Dense's output. See the module docstring."""

  option_defaults = {"activation": "gelu"}
  needs_matrix = True

  def validate(self, target: Target) -> None:
    super().validate(target)
    check_activation(target)

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    d, m = target.matrix_shape[1], target.rank
    key_down, key_up = jax.random.split(rng)
    init = jax.nn.initializers.truncated_normal(stddev=1e-3)
    return {
        "down": init(key_down, (d, m), jnp.float32),
        "down_bias": jnp.zeros((m,), jnp.float32),
        "up": init(key_up, (m, d), jnp.float32),
        "up_bias": jnp.zeros((d,), jnp.float32),
    }

  def hook(self, call, args, kwargs, leaves, target, call_index):
    y = call(*args, **kwargs)
    h, shape = _features_last(y, target)
    out = h.astype(jnp.float32) + bottleneck(h, leaves, target.option("activation"))
    return out.reshape(shape).astype(y.dtype)
