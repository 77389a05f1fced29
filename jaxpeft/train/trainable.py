"""Which parameters a run trains, and how the model is called with them.

A run's model parameters come from `model.init` (or a pretrained loader) and are split in two:

* `params` — what the optimizer sees: `{"base": <base leaves matching config.trainable.base>,
  "adapter": <adapter leaves>}` (the "adapter" entry only when `config.adapter.method` is set);
* `frozen` — every other base leaf, read but never differentiated and given no optimizer state.

Full fine-tuning is `trainable.base='.*'` with no adapter; a linear probe trains only the head
(`trainable.base='head/.*'`); an adapter run trains the adapter (and, typically, a new head). The model is
called with the base tree reassembled and the adapter applied, either by rebuilding the weights
(`adapter.mode='reparam'`, `jaxpeft.adapters.reparam.apply`) or by adding the adapter branch to
the targeted layers' activations (`adapter.mode='factored'`, `jaxpeft.adapters.factored`).
Adapters that add modules (bottleneck adapters, prompts: `jaxpeft.adapters.module_hooks`) always run
through their module hooks, and are exported unmerged (the adapter file holds them).

What is specific to a method is declared by the method (`jaxpeft.adapters.core.AdapterMethod`'s
optional hooks) and only asked for here, so no method is named in this package:

* `update_rule`, built from the keyword arguments of `config.adapter.update`, chained after the
  optimizer on the adapter leaves;
* `loss_term`, built from the keyword arguments of `config.adapter.penalty` and added to the training
  loss inside the step;
* `reselect`, run between two steps every `config.adapter.reselect_every` steps (0: never). It rewrites
  base leaves (`rewrites_base`), so the loop saves `state.frozen` in every checkpoint of such runs;
* `calibrate` + `calibrated_init`, an init from activations of `config.adapter.calibration_batches`
  training batches. The (residual) base it returns is what `split` returns and the run freezes;
* `frozen_leaves` get no update and no optimizer state; `no_decay_leaves` are updated by the same
  optimizer built with `weight_decay=0` (`no_decay_optimizer`, passed to `Trainable.optimizer`);
  `training_optimizer` builds both and clips the gradient of all trained leaves by one global norm first;
* `trained_count`, the trained-parameter count of one target's leaves.

Base-modifying inits without data (`AdapterMethod.modifies_base`, e.g. residual inits) also get their
residual base from `split`.

With `config.quantize.format` set (`jaxpeft.train.quantized_base`), `split` quantizes the frozen base after
the adapter's init, and every use of the base below dequantizes it first, inside the traced step.
"""

import dataclasses
import inspect
import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from flax import traverse_util

from jaxpeft.adapters import application, partition, reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdapterMethod, LossTerm, get_method, has_hook
from jaxpeft.adapters.selection import select_targets
from jaxpeft.quantize import dequantize_tree
from jaxpeft.train.optimizer import build_optimizer
from jaxpeft.train.quantized_base import QuantizeSpec

PyTree = Any
# term(base_params, adapter_params, rng) -> scalar added to the training loss.
Penalty = LossTerm


def adapter_config(config: ml_collections.ConfigDict) -> AdapterConfig | None:
  """The AdapterConfig described by `config.adapter`, or None when `adapter.method` is ''."""
  a = config.adapter
  if not a.method:
    return None
  return AdapterConfig(
      targets=a.targets,
      method=a.method,
      rank=a.rank,
      alpha=a.alpha,
      dropout=a.dropout,
      use_rslora=a.use_rslora,
      init=a.init,
      options=dict(a.options),
      # ((regex, value), ...) pairs: fan_in_axes (input axes of >2-D leaves), per-leaf ranks/alphas, scan axes.
      **{
          name: tuple(a.get(name, ())) for name in ("fan_in_axes", "rank_pattern", "alpha_pattern", "stacked_axes")
      },
  )


def _method_hook(config: ml_collections.ConfigDict, field: str, hook: str, what: str, *args: Any) -> Any:
  """`method.<hook>(*args, **config.adapter.<field>)`, or None when the method does not implement the hook.

  Options set for a method without the hook, or options its hook does not take, are errors.
  """
  options = dict(config.adapter.get(field) or {})
  method = get_method(config.adapter.method) if config.adapter.method else None
  if method is None or not has_hook(method, hook):
    if options:
      raise ValueError(
          f"config.adapter.{field}={options} is set, but method {config.adapter.method!r} has no"
          f" {what}; leave it empty."
      )
    return None
  try:
    return getattr(method, hook)(*args, **options)
  except TypeError as e:
    accepted = [
        p
        for p in inspect.signature(getattr(method, hook)).parameters.values()
        if p.kind == p.KEYWORD_ONLY or p.kind == p.VAR_KEYWORD
    ]
    raise ValueError(
        f"config.adapter.{field}={options} does not fit {config.adapter.method!r}'s {what}"
        f" ({e}); it takes: {', '.join(map(str, accepted))}."
    ) from None


def adapter_update(config: ml_collections.ConfigDict) -> optax.GradientTransformation | None:
  """The method's own update rule (`update_rule`) from `config.adapter.update`, or None."""
  return _method_hook(config, "update", "update_rule", "update rule", adapter_config(config))


def adapter_penalty(config: ml_collections.ConfigDict) -> Penalty | None:
  """The method's loss term (`loss_term`) from `config.adapter.penalty`, or None when that is unset."""
  if not config.adapter.get("penalty"):
    return None
  return _method_hook(config, "penalty", "loss_term", "loss term", adapter_config(config))


def adapter_reselect_every(config: ml_collections.ConfigDict) -> int:
  """`config.adapter.reselect_every`, checked against the method (0: no re-selection)."""
  every = int(config.adapter.get("reselect_every") or 0)
  if every < 0:
    raise ValueError(f"config.adapter.reselect_every={every} must be >= 0 (0: off).")
  if every and not (config.adapter.method and has_hook(get_method(config.adapter.method), "reselect")):
    raise ValueError(
        f"config.adapter.reselect_every={every} is set, but method {config.adapter.method!r} has no"
        " re-selection; set it to 0."
    )
  return every


def no_decay_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation | None:
  """`config.optimizer` built with `weight_decay=0`, for the method's `no_decay_leaves`; None if not needed.

  Not needed when the method has no such leaves or the optimizer's weight decay is unset or zero.
  """
  if not config.adapter.method or not get_method(config.adapter.method).no_decay_leaves:
    return None
  if not config.get("optimizer") or not config.optimizer.get("weight_decay"):
    return None
  opt_config = config.optimizer.copy_and_resolve_references()
  opt_config.weight_decay = 0.0
  return build_optimizer(opt_config, config.num_train_steps, clip=False)


def training_optimizer(trainable: "Trainable", config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The run's optimizer: `config.optimizer` over the trained leaves, after global-norm gradient clipping.

  `Trainable.optimizer` splits the trained leaves into optimizer groups (the method's `no_decay_leaves` take
  `no_decay_optimizer`); `config.optimizer.grad_clip_norm` (0: none) clips the gradient of all of them before
  that split, so one global norm is taken over every trained leaf, whatever its group.
  """
  tx = trainable.optimizer(
      build_optimizer(config.optimizer, config.num_train_steps, clip=False), no_decay_optimizer(config)
  )
  clip_norm = config.optimizer.get("grad_clip_norm")
  return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


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
    penalty: the adapter method's loss term (`adapter_penalty`), added to the training loss.
    reselect_every: steps between the method's re-selections (`reselect`); 0: never.
    quantize: how the frozen base is stored quantized (`config.quantize`), or None (float).
  """

  model: nn.Module
  base_pattern: str
  adapter: AdapterConfig | None = None
  mode: str = "reparam"
  update: optax.GradientTransformation | None = None
  penalty: Penalty | None = None
  reselect_every: int = 0
  quantize: QuantizeSpec | None = None

  @classmethod
  def from_config(cls, model: nn.Module, config: ml_collections.ConfigDict) -> "Trainable":
    if config.adapter.mode not in application.MODES:
      raise ValueError(f"config.adapter.mode={config.adapter.mode!r}: use 'reparam' or 'factored'.")
    reselect_every, quantize = adapter_reselect_every(config), QuantizeSpec.from_config(config)
    if reselect_every and quantize is not None:
      raise ValueError(
          f"config.adapter.reselect_every={reselect_every} rewrites the frozen base between steps, which"
          " a quantized base (config.quantize.format) cannot take; set one of them off."
      )
    return cls(
        model,
        config.trainable.base,
        adapter_config(config),
        config.adapter.mode,
        adapter_update(config),
        adapter_penalty(config),
        reselect_every,
        quantize,
    )

  def _train_flag(self, train: bool) -> dict[str, bool]:
    """`{"train": train}` for a model whose `__call__` takes it (dropout, BatchNorm); `{}` for one without."""
    return {"train": train} if "train" in inspect.signature(type(self.model).__call__).parameters else {}

  @property
  def method(self) -> AdapterMethod | None:
    """The adapter method, or None without an adapter."""
    return None if self.adapter is None else get_method(self.adapter.method)

  @property
  def adds_modules(self) -> bool:
    """Whether the adapter adds modules (runs through module hooks and cannot be merged)."""
    return self.adapter is not None and application.adds_modules(self.adapter)

  @property
  def needs_calibration(self) -> bool:
    """Whether the adapter's init reads activations: pass `calibrate`'s result to `split`."""
    return self.adapter is not None and has_hook(self.method, "calibrated_init")

  @property
  def rewrites_base(self) -> bool:
    """Whether training rewrites base leaves between steps (a re-selection merges into them)."""
    return self.reselect_every > 0

  def adapter_fits_original_base(self, frozen: PyTree, params: PyTree) -> bool:
    """Whether the adapter leaves alone, applied to the *original* base weights, give the trained model.

    Not so when the run trains on a rewritten base: a residual-base init (`W - s a0 b0`) or a
    re-selection that merges into the base. Then only the merged export is meaningful.
    """
    if self.adapter is None or self.rewrites_base:
      return False
    method = get_method(self.adapter.method)
    base = jax.eval_shape(self._base, params, frozen)
    return not any(method.modifies_base(t) for t in select_targets(self.adapter, base))

  def calibrate(self, base_params: PyTree, batches: Iterable[list[jax.Array]]) -> PyTree:
    """What the method's calibrated init reads (`AdapterMethod.calibrate`) from batches of model inputs.

    Each batch is the list of the model's positional inputs; the model runs with `train=False`.
    """
    if not self.needs_calibration:
      raise ValueError(
          f"Adapter method {self.adapter.method if self.adapter else None!r} has no calibrated init;"
          " call split without calibration."
      )
    apply_fn = lambda params, inputs: self.model.apply({"params": params}, *inputs, **self._train_flag(False))
    return self.method.calibrate(apply_fn, base_params, batches, self.adapter)

  def split(self, rng: jax.Array, base_params: PyTree, calibration: PyTree = None) -> tuple[PyTree, PyTree]:
    """`(params, frozen)` for a fresh run from the model's (pretrained) `base_params`.

    Base-modifying inits replace the targeted base leaves by their residual. A calibrated init uses
    `calibration` (from `calibrate`); without it the method's data-free `init` runs (same shapes, e.g.
    for shape-only tracing).
    """
    if calibration is not None and not self.needs_calibration:
      raise ValueError("split got a calibration, but the adapter method has no calibrated init.")
    adapter = None
    if calibration is not None:
      base_params, adapter = self.method.calibrated_init(self.adapter, base_params, calibration)
    elif self.adapter is not None:
      base_params, adapter = reparam.init_with_base(rng, self.adapter, base_params)
    trained_base, frozen = _split(base_params, self.base_pattern)
    if self.quantize is not None:
      frozen = self.quantize.quantize_frozen(frozen, trained_base)
    params = {"base": trained_base}
    if adapter is not None:
      params["adapter"] = adapter
    if not jax.tree.leaves(params):
      paths = list(traverse_util.flatten_dict(base_params, sep="/"))
      raise ValueError(
          f"Nothing to train: config.trainable.base={self.base_pattern!r} matches none of the"
          f" model's parameters ({', '.join(paths[:12])}{', ...' if len(paths) > 12 else ''}) and"
          " config.adapter.method is ''. Set one of them."
      )
    return params, frozen

  def optimizer(
      self, tx: optax.GradientTransformation, no_decay: optax.GradientTransformation | None = None
  ) -> optax.GradientTransformation:
    """`tx` for the trained leaves; adapter leaves the method keeps fixed get no update or state.

    With `no_decay` (`tx` without weight decay: `no_decay_optimizer`), the method's `no_decay_leaves` take it.
    """
    if self.adapter is None:
      return tx
    no_decay_tx, no_decay = no_decay, (self.method.no_decay_leaves if no_decay is not None else frozenset())

    def adapter_labels(adapter):
      flat = traverse_util.flatten_dict(partition.optimizer_labels(adapter, self.adapter))
      return traverse_util.unflatten_dict(
          {k: "no_decay" if label == "trainable" and k[-1] in no_decay else label for k, label in flat.items()}
      )

    def labels(params):
      return {
          "base": jax.tree.map(lambda _: "trainable", params["base"]),
          "adapter": adapter_labels(params["adapter"]),
      }

    transforms = {"trainable": tx, "frozen": optax.set_to_zero()}
    if no_decay:
      transforms["no_decay"] = no_decay_tx
    tx = optax.multi_transform(transforms, labels)
    if self.update is None:
      return tx
    adapter_only = lambda params: {
        "base": jax.tree.map(lambda _: False, params["base"]),
        "adapter": jax.tree.map(lambda _: True, params["adapter"]),
    }
    return optax.chain(tx, optax.masked(self.update, adapter_only))

  def num_trained(self, params: PyTree) -> int:
    """Scalars the training can change: trained base leaves plus the method's `trained_count` per target."""
    count = partition.param_count(params["base"])
    if self.adapter is not None:
      by_target: dict[str, dict[str, jax.Array]] = {}
      for key, leaf in traverse_util.flatten_dict(params["adapter"], sep="/").items():
        path, _, name = key.rpartition("/")
        by_target.setdefault(path, {})[name] = leaf
      count += sum(self.method.trained_count(leaves) for leaves in by_target.values())
    return count

  def _base(self, params: PyTree, frozen: PyTree) -> PyTree:
    """The model's base tree: frozen and trained leaves joined, quantized leaves dequantized."""
    return dequantize_tree(_join(frozen, params["base"]))

  def regularizer(self, params: PyTree, frozen: PyTree, rng: jax.Array) -> jax.Array | None:
    """The method's loss term at `params` (None when it has none); `rng` draws its random choices."""
    if self.penalty is None:
      return None
    return self.penalty(self._base(params, frozen), params["adapter"], rng)

  def reselects_after(self, step: int) -> bool:
    """Whether the method re-selects its trained entries after `step` updates."""
    return self.reselect_every > 0 and step > 0 and step % self.reselect_every == 0

  def reselect(self, params: PyTree, frozen: PyTree) -> tuple[PyTree, PyTree]:
    """`(params, frozen)` after the method's re-selection (`AdapterMethod.reselect`).

    The model's function is unchanged; the optimizer state must be restarted by the caller
    (`jaxpeft.train.step.make_reselect_step` does both).
    """
    base, adapter = self.method.reselect(_join(frozen, params["base"]), params["adapter"], self.adapter)
    trained_base, frozen = _split(base, self.base_pattern)
    return {"base": trained_base, "adapter": adapter}, frozen

  def model_params(self, params: PyTree, frozen: PyTree) -> PyTree:
    """The full parameter tree the model consumes, with the adapter merged in (reparam mode)."""
    base = self._base(params, frozen)
    if self.adapter is None:
      return base
    return application.model_params(base, params["adapter"], self.adapter, self.mode)

  def apply(
      self,
      params: PyTree,
      frozen: PyTree,
      inputs: list[jax.Array],
      *,
      train: bool,
      rng: jax.Array | None = None,
      model_state: PyTree | None = None,
      mutable: Any = False,
  ) -> Any:
    """Runs the model on `inputs` with the trained and frozen parameters.

    `model_state` holds the model's other collections (BatchNorm's `batch_stats`); with `mutable` a list
    of collection names, returns `(logits, updated collections)` as `flax.linen.Module.apply` does. `train`
    reaches the model only if its `__call__` takes a `train` argument.
    """
    rngs = {"dropout": rng} if rng is not None else {}
    variables = lambda model_params: {"params": model_params, **(model_state or {})}
    run = lambda model_params: self.model.apply(
        variables(model_params), *inputs, **self._train_flag(train), rngs=rngs, mutable=mutable
    )
    base = self._base(params, frozen)
    if self.adapter is None:
      return run(base)
    with application.applied(
        base, params["adapter"], self.adapter, mode=self.mode, rng=rng, deterministic=not train
    ) as model_params:
      return run(model_params)

  def merged(self, params: PyTree, frozen: PyTree, quantized_keep: str | None = None) -> PyTree:
    """Base and adapter merged into one tree of the model's own structure (for export).

    An adapter that adds modules cannot be merged: the base tree alone (the adapter is exported apart).
    On a quantized base, `QuantizeSpec.merged` (quantized leaves re-quantized or dequantized per
    `quantized_keep`, default `config.quantize.export_keep`).
    """
    base = _join(frozen, params["base"])
    mergeable = self.adapter is not None and not self.adds_modules
    if self.quantize is not None:
      return self.quantize.merged(base, params["adapter"] if mergeable else None, self.adapter, quantized_keep)
    if not mergeable:
      return base
    return reparam.merge(base, params["adapter"], self.adapter)
