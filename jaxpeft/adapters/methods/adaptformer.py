"""AdaptFormer: a scaled bottleneck in parallel with a transformer block's MLP.

Paper: Chen, Ge, Tong, Wang, Song, Wang, Luo, "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", NeurIPS 2022, arXiv:2205.13535. Reference implementation followed: ShoufaChen/AdaptFormer
(``models/adapter.py`` ``Adapter`` with ``init_option="lora"``, ``adapter_layernorm_option="none"``;
``models/custom_modules.py`` ``Block.forward`` with ``ffn_option="parallel"``).

Math (method ``"adaptformer"``), with ``x`` the input of the hooked MLP sub-block and ``MLP(x)`` its output::

    MLP'(x) = MLP(x) + s * (relu(x @ down + down_bias) @ up + up_bias),
    down: (d, m),  up: (m, d),  m = config.rank,  s = option ``scale`` (default 0.1, the paper's)

Init ("lora" option of the reference): ``down`` PyTorch ``kaiming_uniform_(a=sqrt(5))``, i.e.
``U(-1/sqrt(d), 1/sqrt(d))``; ``up = 0``; biases 0 -- so the model is unchanged at init. Parameters per
block: ``2 m d + m + d``. Not mergeable (ReLU).

Placement, as the reference's ``Block.forward``: the adapter reads the residual stream that enters the
block's MLP branch and adds its output to that branch's output, before the residual addition. So
``config.targets`` selects the kernel of the first projection of an MLP *module* (``d`` = its input width) and
the hook wraps that kernel's parent (``hook_levels_up = 1``), which must be an MLP branch: its children are
layers only and exactly two projection kernels, the targeted ``(d, h)`` and an ``(h, d)`` one (plus, say, a
LayerNorm). Anything else -- a whole transformer layer, an attention module (four projections), a gated MLP --
is refused.
On the library's models the MLP branch is the submodule ``mlp``:

* ``jaxpeft.models.vit`` (pre-LN): ``r".*mlp/fc1/kernel"``; ``mlp`` holds the block's second LayerNorm, so
  the adapter reads ``x`` before it, exactly as the reference (``adapter_layernorm_option="none"``).
* ``jaxpeft.models.bert`` (post-LN): ``r".*mlp/intermediate/kernel"``; the adapter reads the attention
  sub-block's output, the MLP's input, and adds to the MLP's output after its dropout and before the
  ``LayerNorm(x + .)`` of the layer (the reference adds after ``mlp_drop``, before the residual).

A model whose LayerNorm sits outside its MLP module gives an adapter that reads ``LN(x)`` instead, as the
reference's ``adapter_layernorm_option="in"`` with the block's LayerNorm. The reference's adapter dropout
(0.1) is not implemented.

Usage: ``with module_hooks.intercept(params, adapter_params, config): model.apply(...)`` (the module-hook
mechanism, see ``jaxpeft.adapters.module_hooks``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import Leaves, Target, register_method
from jaxpeft.adapters.module_hooks import ModuleHookMethod, bottleneck


@register_method("adaptformer")
class AdaptFormer(ModuleHookMethod):
  """``MLP'(x) = MLP(x) + s * up(relu(down(x)))``. See the module docstring."""

  option_defaults = {"scale": 0.1}
  hook_levels_up = 1
  layout = "dense"
  layout_hint = "AdaptFormer targets the 2-D kernel of the MLP's first Dense (its input width is the adapter's d)."

  def check_module(self, module_params, module_path, target):
    nested = sorted(
        name
        for name, child in module_params.items()
        if not isinstance(child, Mapping) or any(isinstance(v, Mapping) for v in child.values())
    )
    kernels = {
        name: tuple(child["kernel"].shape)
        for name, child in module_params.items()
        if name not in nested and "kernel" in child
    }
    d, hidden = target.layer_shape
    if nested:
      found = f"it has submodules {nested}"
    elif len(kernels) != 2 or sorted(kernels.values()) != sorted([(d, hidden), (hidden, d)]):
      found = f"its projection kernels are {kernels}; an MLP has two, ({d}, {hidden}) and ({hidden}, {d})"
    else:
      return
    raise ValueError(
        f"{target.path}: AdaptFormer wraps the module above the targeted kernel, "
        f"{module_path!r}, which is not an MLP ({found}). Target the first projection kernel "
        "of an MLP submodule, e.g. r'.*mlp/fc1/kernel' (jaxpeft ViT) or "
        "r'.*mlp/intermediate/kernel' (jaxpeft BERT)."
    )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    d, m = target.matrix_shape[0], target.rank
    bound = 1.0 / jnp.sqrt(d)
    return {
        "down": jax.random.uniform(rng, (d, m), jnp.float32, -bound, bound),
        "down_bias": jnp.zeros((m,), jnp.float32),
        "up": jnp.zeros((m, d), jnp.float32),
        "up_bias": jnp.zeros((d,), jnp.float32),
    }

  def hook(self, call, args, kwargs, leaves, target, call_index):
    if not args:
      raise ValueError(
          f"{target.path}: AdaptFormer needs the hooked MLP to receive its input as the first "
          "positional argument."
      )
    x = args[0]
    y = call(*args, **kwargs)
    d = target.matrix_shape[0]
    if x.shape[-1] != d or y.shape[-1] != d:
      raise ValueError(
          f"{target.path}: the hooked module maps width {x.shape[-1]} to {y.shape[-1]}, but "
          f"AdaptFormer needs both to equal the targeted kernel's input width {d}."
      )
    return (y + target.option("scale") * bottleneck(x, leaves, "relu")).astype(y.dtype)
