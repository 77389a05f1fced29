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
(`jaxpeft.adapters.sora.proximal_l1`, e.g. `update.sparse_lambda=1e-3`). (ALLoRA's per-row gradient
scale is part of its adapter's differentiation, `jaxpeft.adapters.allora`, set by `options.eta`.)

Three more per-method hooks, each a registry entry below (the loop and step stay method-agnostic):

* a loss term, built from the keyword arguments of `config.adapter.penalty` and added to the training
  loss inside the step: SaRA's nuclear norm (`jaxpeft.adapters.sara.nuclear_norm_penalty`;
  `penalty.lambda_rank`, optional `penalty.min_dim` (64) and `penalty.sample` (True: one eligible
  matrix drawn per step, as the reference; False: all of them));
* a re-selection every `config.adapter.reselect_every` steps (0: never), run between two steps:
  SaRA's progressive schedule (`jaxpeft.adapters.sara.reselect`: the trained delta is merged into the
  base and the mask redrawn on the merged weights). It rewrites base leaves (`rewrites_base`), so the
  loop saves `state.frozen` in every checkpoint of such runs;
* a calibrated init, from activations of `config.adapter.calibration_batches` training batches:
  CorDA (`jaxpeft.adapters.corda`: input covariances of the targets, then the residual base
  `W - s a0 b0` and the adapter `a0, b0`). The residual base is what `split` returns and the run
  freezes; `merged` gives `W_res + s a b`, the trained model in the original layout.

Base-modifying inits without data (LoRA's `init='pissa'`) also get their residual base from `split`.
"""

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import optax
from flax import traverse_util

from jaxpeft.adapters import corda, factored, module_hooks, partition, reparam, sara, sora
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import get_method
from jaxpeft.adapters.selection import select_targets

PyTree = Any
# term(base_params, adapter_params, rng) -> scalar added to the training loss.
Penalty = Callable[[PyTree, PyTree, jax.Array], jax.Array]


def _sara_penalty(config: AdapterConfig, *, lambda_rank: float, min_dim: int = 64, sample: bool = True) -> Penalty:
  if not lambda_rank > 0:
    raise ValueError(f"config.adapter.penalty.lambda_rank={lambda_rank} must be > 0 (the reference uses 5e-4).")

  def term(base_params, adapter_params, rng):
    return sara.nuclear_norm_penalty(base_params, adapter_params, config, lambda_rank, min_dim=min_dim,
                                     rng=rng if sample else None)

  return term


class _CalibratedInit(NamedTuple):
  collect: Callable[..., PyTree]  # (apply_fn, base_params, batches, adapter_config) -> calibration
  init: Callable[..., tuple[PyTree, PyTree]]  # (adapter_config, base_params, calibration) -> (base, adapter)


# method -> its update rule, built from `config.adapter.update` and applied to the adapter leaves.
_UPDATE_RULES = {"sora": lambda **kw: optax.masked(sora.proximal_l1(**kw), sora.gate_mask)}
# method -> its loss term, built as `factory(adapter_config, **config.adapter.penalty)`.
_PENALTIES = {"sara": _sara_penalty}
# method -> rule(base_params, adapter_params, adapter_config) -> (base_params, adapter_params), run every
# `config.adapter.reselect_every` steps.
_RESELECT_RULES = {"sara": sara.reselect}
# method -> its init from calibration activations.
_CALIBRATED_INITS = {"corda": _CalibratedInit(corda.collect_covariances, corda.init_with_base)}


def adapter_config(config: ml_collections.ConfigDict) -> AdapterConfig | None:
  """The AdapterConfig described by `config.adapter`, or None when `adapter.method` is ''."""
  a = config.adapter
  if not a.method:
    return None
  return AdapterConfig(
      targets=a.targets, method=a.method, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
      use_rslora=a.use_rslora, init=a.init, options=dict(a.options),
      # ((regex, value), ...) pairs: fan_in_axes (input axes of >2-D leaves), per-leaf ranks/alphas, scan axes.
      **{name: tuple(a.get(name, ())) for name in ("fan_in_axes", "rank_pattern", "alpha_pattern",
                                                   "stacked_axes")},
  )


def _method_rule(config: ml_collections.ConfigDict, field: str, registry: dict[str, Callable[..., Any]], what: str,
                 example: str, *args: Any) -> Any:
  """`registry[method](*args, **config.adapter.<field>)`, or None for a method without an entry.

  Options set for a method without an entry, or options its entry does not take, are errors.
  """
  options = dict(config.adapter.get(field) or {})
  factory = registry.get(config.adapter.method)
  if factory is None:
    if options:
      raise ValueError(f"config.adapter.{field}={options} is set, but method {config.adapter.method!r} has no"
                       f" {what} (only {sorted(registry)} do); leave it empty.")
    return None
  try:
    return factory(*args, **options)
  except TypeError as e:
    raise ValueError(f"config.adapter.{field}={options} does not fit {config.adapter.method!r}'s {what}"
                     f" ({e}); e.g. {example}.") from None


def adapter_update(config: ml_collections.ConfigDict) -> optax.GradientTransformation | None:
  """The method's own update rule from `config.adapter.update` (SoRA), or None."""
  return _method_rule(config, "update", _UPDATE_RULES, "update rule", "sora: update.sparse_lambda")


def adapter_penalty(config: ml_collections.ConfigDict) -> Penalty | None:
  """The method's loss term from `config.adapter.penalty` (SaRA's nuclear norm), or None when it is unset."""
  if not config.adapter.get("penalty"):
    return None
  return _method_rule(config, "penalty", _PENALTIES, "loss term",
                      "sara: penalty.lambda_rank, penalty.min_dim, penalty.sample", adapter_config(config))


def adapter_reselect_every(config: ml_collections.ConfigDict) -> int:
  """`config.adapter.reselect_every`, checked against the method (0: no re-selection)."""
  every = int(config.adapter.get("reselect_every") or 0)
  if every < 0:
    raise ValueError(f"config.adapter.reselect_every={every} must be >= 0 (0: off).")
  if every and config.adapter.method not in _RESELECT_RULES:
    raise ValueError(f"config.adapter.reselect_every={every} is set, but method {config.adapter.method!r} has no"
                     f" re-selection (only {sorted(_RESELECT_RULES)} do); set it to 0.")
  return every


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
  """

  model: nn.Module
  base_pattern: str
  adapter: AdapterConfig | None = None
  mode: str = "reparam"
  update: optax.GradientTransformation | None = None
  penalty: Penalty | None = None
  reselect_every: int = 0

  @classmethod
  def from_config(cls, model: nn.Module, config: ml_collections.ConfigDict) -> "Trainable":
    if config.adapter.mode not in ("reparam", "factored"):
      raise ValueError(f"config.adapter.mode={config.adapter.mode!r}: use 'reparam' or 'factored'.")
    return cls(model, config.trainable.base, adapter_config(config), config.adapter.mode, adapter_update(config),
               adapter_penalty(config), adapter_reselect_every(config))

  @property
  def adds_modules(self) -> bool:
    """Whether the adapter adds modules (runs through module hooks and cannot be merged)."""
    return self.adapter is not None and isinstance(get_method(self.adapter.method), module_hooks.ModuleHookMethod)

  @property
  def needs_calibration(self) -> bool:
    """Whether the adapter's init reads activations (CorDA): pass `calibrate`'s result to `split`."""
    return self.adapter is not None and self.adapter.method in _CALIBRATED_INITS

  @property
  def rewrites_base(self) -> bool:
    """Whether training rewrites base leaves between steps (a re-selection merges into them)."""
    return self.reselect_every > 0

  def adapter_fits_original_base(self, frozen: PyTree, params: PyTree) -> bool:
    """Whether the adapter leaves alone, applied to the *original* base weights, give the trained model.

    Not so when the run trains on a rewritten base: a residual-base init (PiSSA, CorDA: `W - s a0 b0`)
    or a re-selection that merges into the base (SaRA). Then only the merged export is meaningful.
    """
    if self.adapter is None or self.rewrites_base:
      return False
    method = get_method(self.adapter.method)
    base = _join(frozen, params["base"])
    return not any(method.modifies_base(t) for t in select_targets(self.adapter, base))

  def calibrate(self, base_params: PyTree, batches: Iterable[list[jax.Array]]) -> PyTree:
    """What the calibrated init needs (CorDA: the targets' input covariances) from batches of model inputs.

    Each batch is the list of the model's positional inputs; the model runs with `train=False`.
    """
    if not self.needs_calibration:
      raise ValueError(f"Adapter method {self.adapter.method if self.adapter else None!r} has no calibrated init"
                       f" (only {sorted(_CALIBRATED_INITS)} do); call split without calibration.")
    apply_fn = lambda params, inputs: self.model.apply({"params": params}, *inputs, train=False)
    return _CALIBRATED_INITS[self.adapter.method].collect(apply_fn, base_params, batches, self.adapter)

  def split(self, rng: jax.Array, base_params: PyTree, calibration: PyTree = None) -> tuple[PyTree, PyTree]:
    """`(params, frozen)` for a fresh run from the model's (pretrained) `base_params`.

    Base-modifying inits replace the targeted base leaves by their residual (PiSSA; CorDA). CorDA uses
    `calibration` (from `calibrate`); without it, it falls back to its data-free form (``C = I``: the
    plain SVD of the kernel), which has the same shapes, for shape-only tracing.
    """
    if calibration is not None and not self.needs_calibration:
      raise ValueError("split got a calibration, but the adapter method has no calibrated init.")
    adapter = None
    if calibration is not None:
      base_params, adapter = _CALIBRATED_INITS[self.adapter.method].init(self.adapter, base_params, calibration)
    elif self.adapter is not None:
      base_params, adapter = reparam.init_with_base(rng, self.adapter, base_params)
    trained_base, frozen = _split(base_params, self.base_pattern)
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

  def regularizer(self, params: PyTree, frozen: PyTree, rng: jax.Array) -> jax.Array | None:
    """The method's loss term at `params` (None when it has none); `rng` draws its random choices."""
    if self.penalty is None:
      return None
    return self.penalty(_join(frozen, params["base"]), params["adapter"], rng)

  def reselects_after(self, step: int) -> bool:
    """Whether the method re-selects its trained entries after `step` updates."""
    return self.reselect_every > 0 and step > 0 and step % self.reselect_every == 0

  def reselect(self, params: PyTree, frozen: PyTree) -> tuple[PyTree, PyTree]:
    """`(params, frozen)` after the method's re-selection (SaRA: merge the delta, redraw the mask).

    The model's function is unchanged; the optimizer state must be restarted by the caller
    (`jaxpeft.train.step.make_reselect_step` does both).
    """
    rule = _RESELECT_RULES[self.adapter.method]
    base, adapter = rule(_join(frozen, params["base"]), params["adapter"], self.adapter)
    trained_base, frozen = _split(base, self.base_pattern)
    return {"base": trained_base, "adapter": adapter}, frozen

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
