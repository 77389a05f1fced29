"""Which parameters a run trains, and how the model is called with them.

A run's model parameters come from `model.init` (or a pretrained loader) and are split in two:

* `params` — what the optimizer sees: `{"base": <base leaves matching config.trainable.base>,
  "adapter": <adapter leaves>}` (the "adapter" entry only when `config.adapter.method` is set);
* `frozen` — every other base leaf, read but never differentiated and given no optimizer state.

Full fine-tuning is `trainable.base='.*'` with no adapter; a linear probe trains only the head
(`trainable.base='head/.*'`); LoRA trains the adapter (and, typically, a new head). The model is
called with the base tree reassembled and the adapter applied, either by rebuilding the weights
(`adapter.mode='reparam'`, `jaxpeft.adapters.reparam.apply`) or by adding the adapter branch to
the targeted layers' activations (`adapter.mode='factored'`, `jaxpeft.adapters.factored`).
Adapters that add modules (Houlsby, AdaptFormer, prompts: `jaxpeft.adapters.module_hooks`) always run
through their module hooks, and are exported unmerged (the adapter file holds them).

Methods with their own update rule get it chained after the optimizer on their adapter leaves, with
the keyword arguments of `config.adapter.update`: SoRA's proximal L1 step on the gates
(`jaxpeft.adapters.sora.proximal_l1`, e.g. `update.sparse_lambda=1e-3`) and ALLoRA's per-row rate
(`jaxpeft.adapters.allora.scale_by_allora`, `update.eta`).
"""

import contextlib
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from flax import traverse_util

from jaxpeft.adapters import allora, factored, module_hooks, partition, reparam, sara, sora
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import get_method

PyTree = Any

# method -> its update rule, built from `config.adapter.update` and applied to the adapter leaves.
_UPDATE_RULES = {
    "sora": lambda **kw: optax.masked(sora.proximal_l1(**kw), sora.gate_mask),
    "allora": allora.scale_by_allora,
}


def adapter_config(config: ml_collections.ConfigDict) -> AdapterConfig | None:
  """The AdapterConfig described by `config.adapter`, or None when `adapter.method` is ''."""
  a = config.adapter
  if not a.method:
    return None
  return AdapterConfig(
      targets=a.targets, method=a.method, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
      use_rslora=a.use_rslora, init=a.init, options=dict(a.options),
      # ((regex, n), ...): input axes of >2-D leaves (DenseGeneral attention, Conv kernels).
      fan_in_axes=tuple(a.get("fan_in_axes", ())),
  )


def adapter_update(config: ml_collections.ConfigDict) -> optax.GradientTransformation | None:
  """The method's own update rule from `config.adapter.update` (SoRA, ALLoRA), or None."""
  options = dict(config.adapter.get("update") or {})
  rule = _UPDATE_RULES.get(config.adapter.method)
  if rule is None:
    if options:
      raise ValueError(f"config.adapter.update={options} is set, but method {config.adapter.method!r} has no"
                       f" update rule (only {sorted(_UPDATE_RULES)} do); leave it empty.")
    return None
  try:
    return rule(**options)
  except TypeError as e:
    raise ValueError(f"config.adapter.update={options} does not fit {config.adapter.method!r}'s update rule"
                     f" ({e}); e.g. sora: update.sparse_lambda, allora: update.eta.") from None


def _split(tree: PyTree, pattern: str) -> tuple[PyTree, PyTree]:
  flat = traverse_util.flatten_dict(tree, sep="/")
  regex = re.compile(pattern) if pattern else None
  chosen = {k: v for k, v in flat.items() if regex is not None and regex.fullmatch(k)}
  rest = {k: v for k, v in flat.items() if k not in chosen}
  return traverse_util.unflatten_dict(chosen, sep="/"), traverse_util.unflatten_dict(rest, sep="/")


def _join(a: PyTree, b: PyTree) -> PyTree:
  return traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(a, sep="/"), **traverse_util.flatten_dict(b, sep="/")}, sep="/"
  )


@dataclasses.dataclass(frozen=True)
class Trainable:
  """The trained/frozen split of one run (see the module docstring).

  Attributes:
    model: the Flax linen model.
    base_pattern: regex (full match over '/'-joined paths) of base leaves that are trained.
    adapter: the adapter config, or None.
    mode: 'reparam' or 'factored' (how the adapter enters the model).
    update: the adapter method's own update rule (`adapter_update`), chained after the optimizer.
  """

  model: nn.Module
  base_pattern: str
  adapter: AdapterConfig | None = None
  mode: str = "reparam"
  update: optax.GradientTransformation | None = None

  @classmethod
  def from_config(cls, model: nn.Module, config: ml_collections.ConfigDict) -> "Trainable":
    if config.adapter.mode not in ("reparam", "factored"):
      raise ValueError(f"config.adapter.mode={config.adapter.mode!r}: use 'reparam' or 'factored'.")
    return cls(model, config.trainable.base, adapter_config(config), config.adapter.mode, adapter_update(config))

  @property
  def adds_modules(self) -> bool:
    """Whether the adapter adds modules (runs through module hooks and cannot be merged)."""
    return self.adapter is not None and isinstance(get_method(self.adapter.method), module_hooks.ModuleHookMethod)

  def split(self, rng: jax.Array, base_params: PyTree) -> tuple[PyTree, PyTree]:
    """`(params, frozen)` for a fresh run from the model's (pretrained) `base_params`."""
    trained_base, frozen = _split(base_params, self.base_pattern)
    params = {"base": trained_base}
    if self.adapter is not None:
      params["adapter"] = reparam.init(rng, self.adapter, base_params)
    if not jax.tree.leaves(params):
      paths = list(traverse_util.flatten_dict(base_params, sep="/"))
      raise ValueError(
          f"Nothing to train: config.trainable.base={self.base_pattern!r} matches none of the"
          f" model's parameters ({', '.join(paths[:12])}{', ...' if len(paths) > 12 else ''}) and"
          " config.adapter.method is ''. Set one of them."
      )
    return params, frozen

  def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` for the trained leaves; adapter leaves the method keeps fixed get no update or state."""
    if self.adapter is None:
      return tx

    def labels(params):
      return {
          "base": jax.tree.map(lambda _: "trainable", params["base"]),
          "adapter": partition.optimizer_labels(params["adapter"], self.adapter),
      }

    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
    if self.update is None:
      return tx
    adapter_only = lambda params: {"base": jax.tree.map(lambda _: False, params["base"]),
                                   "adapter": jax.tree.map(lambda _: True, params["adapter"])}
    return optax.chain(tx, optax.masked(self.update, adapter_only))

  def num_trained(self, params: PyTree) -> int:
    """Scalars the training can change: trained base leaves plus adapter leaves the method trains.

    A trained adapter leaf stored beside a frozen 0/1 `mask` leaf of its shape (SaRA's sparse delta)
    counts only its masked entries.
    """
    count = partition.param_count(params["base"])
    if self.adapter is not None:
      flat = traverse_util.flatten_dict(params["adapter"], sep="/")
      labels = traverse_util.flatten_dict(partition.optimizer_labels(params["adapter"], self.adapter), sep="/")
      for path, x in flat.items():
        if labels[path] != "trainable":
          continue
        mask = flat.get(f"{path.rpartition('/')[0]}/{sara.MASK}")
        count += int(x.size) if mask is None or mask.shape != x.shape else int((mask != 0).sum())
    return count

  def model_params(self, params: PyTree, frozen: PyTree) -> PyTree:
    """The full parameter tree the model consumes, with the adapter merged in (reparam mode)."""
    base = _join(frozen, params["base"])
    if self.adapter is None or self.mode == "factored" or self.adds_modules:
      return base
    return reparam.apply(base, params["adapter"], self.adapter)

  def apply(self, params: PyTree, frozen: PyTree, inputs: list[jax.Array], *, train: bool,
            rng: jax.Array | None = None) -> jax.Array:
    """Runs the model on `inputs` with the trained and frozen parameters."""
    model_params = self.model_params(params, frozen)
    rngs = {"dropout": rng} if rng is not None else {}
    if self.adds_modules:
      hooks = module_hooks.intercept(model_params, params["adapter"], self.adapter)
    elif self.adapter is not None and self.mode == "factored":
      hooks = factored.intercept(model_params, params["adapter"], self.adapter, rng=rng, deterministic=not train)
    else:
      hooks = contextlib.nullcontext()
    with hooks:
      return self.model.apply({"params": model_params}, *inputs, train=train, rngs=rngs)

  def merged(self, params: PyTree, frozen: PyTree) -> PyTree:
    """Base and adapter merged into one tree of the model's own structure (for export).

    An adapter that adds modules cannot be merged: the base tree alone (the adapter is exported apart).
    """
    base = _join(frozen, params["base"])
    if self.adapter is None or self.adds_modules:
      return base
    return reparam.merge(base, params["adapter"], self.adapter)
