"""Mixed-adapter batches: one forward pass in which example ``i`` uses LoRA adapter ``index[i]``.

``n`` LoRA adapters of one config (same targets; ranks and alphas may differ: ``stack`` pads them to a
common rank with the scale folded into ``b``, see ``hot_swap.pad_to_rank``) are stacked along a new leading
axis, ``a: (n, d_in, R)``, ``b: (n, R, d_out)``. In the activation-hook mode each targeted ``Dense`` /
``DenseGeneral`` call then returns, for example ``i`` of the batch (the leading axis of the layer's input)::

    y_i = x_i W + bias + s (x_i a[k]) b[k],    k = index[i];    index[i] == -1  ->  y_i = x_i W + bias (base)

The per-example factors are gathered by ``jnp.take`` (a batched gather-matmul, as S-LoRA / Punica's BGMV),
so one compiled program serves any mix of adapters: ``index`` is an ordinary jit argument, and so are the
stacked factors. An index outside ``[-1, n)`` gives NaN outputs for that example (``jnp.take``'s fill mode),
so a bad index is visible rather than silently mapped to another adapter.

This is the hook of ``jaxpeft.adapters.factored`` with the method ``"mixed_batch"``
(``jaxpeft.adapters.methods.mixed_batch``): its leaves are the
stacked ``a``, ``b`` and the batch's ``index`` (the same array for every target), and its ``branch`` is
LoRA's branch on gathered factors. Everything else -- target lookup, the DenseGeneral fold, dropout on the
branch input, the check that every target was called -- is ``factored.intercept``'s::

    stacked, config = mixed_batch.stack(base_params, [(cfg_1, lora_1), (cfg_2, lora_2)])

    @jax.jit
    def forward(params, stacked, x, index):
        with mixed_batch.intercept(params, stacked, config, index):
            return model.apply({"params": params}, x)

Hugging Face PEFT offers the same as ``model(x, adapter_names=[...])`` (``"__base__"`` = no adapter,
``LoraLayer._mixed_batch_forward``), with a Python loop over the distinct adapters and boolean masks; PEFT
refuses it for DoRA and for merged adapters, and so does this (LoRA / rsLoRA only; the base must be unmerged).
Limits are those of ``factored``: Dense / DenseGeneral targets, no stacked (scanned) layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.adapters import factored
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.hot_swap import pad_to_rank
from jaxpeft.adapters.reparam import AdapterParams, Params


def stack(
    base_params: Params, adapters: Sequence[tuple[AdapterConfig, AdapterParams]], max_rank: int | None = None
) -> tuple[AdapterParams, AdapterConfig]:
  """``(stacked adapter, config)``: LoRA adapters padded to one rank and stacked along a leading axis.

  Adapter ``k`` of the list is ``index == k``. ``max_rank`` defaults to the largest rank of any module.
  The returned config has ``method="mixed_batch"`` (scale 1: the scales are folded into ``b``).
  """
  if not adapters:
    raise ValueError("mixed_batch.stack needs at least one (config, adapter_params) pair.")
  if max_rank is None:
    max_rank = max(max([c.rank, *dict(c.rank_pattern).values()]) for c, _ in adapters)
  padded = [pad_to_rank(base_params, params, config, max_rank) for config, params in adapters]
  configs = {c for _, c in padded}
  if len(configs) > 1:
    raise ValueError(
        "mixed_batch.stack needs adapters of one layout (same targets, fan_in_axes, "
        f"stacked_axes, dropout); after padding to rank {max_rank} the configs still differ: "
        f"{sorted(map(str, configs))}."
    )
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[p for p, _ in padded])
  return stacked, dataclasses.replace(configs.pop(), method="mixed_batch")


@contextlib.contextmanager
def intercept(
    params: Params,
    stacked: AdapterParams,
    config: AdapterConfig,
    index: jax.Array,
    *,
    rng: jax.Array | None = None,
    deterministic: bool = True,
) -> Iterator[None]:
  """``factored.intercept`` with example ``i`` of the batch using stacked adapter ``index[i]`` (-1: base).

  Args:
    params: the base linen ``variables['params']``.
    stacked, config: from ``stack``.
    index: int array ``(batch,)``; a jit argument, so a new mix reuses the compiled program.
    rng, deterministic: adapter-input dropout, as in ``factored.intercept``.
  """
  if config.method != "mixed_batch":
    raise ValueError(
        f"config.method is {config.method!r}; build the stacked adapter and its config with "
        "mixed_batch.stack(base_params, [(config, adapter), ...])."
    )
  index = jnp.asarray(index)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(
        f"index must be a 1-D int array (one adapter index per example), got {index.dtype} "
        f"of shape {index.shape}."
    )
  flat = traverse_util.flatten_dict(stacked, sep="/")
  flat.update({f"{key.rpartition('/')[0]}/index": index for key in list(flat)})
  with factored.intercept(
      params, traverse_util.unflatten_dict(flat, sep="/"), config, rng=rng, deterministic=deterministic
  ):
    yield
