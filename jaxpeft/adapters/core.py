"""The adapter-method interface and the method registry.

Every reparameterization adapter (LoRA, DoRA, VeRA, LoHa, ...) is one ``AdapterMethod`` subclass in its own
file, registered under a name with ``@register_method("name")``. The functional front-end
(``jaxpeft.adapters.reparam``: ``init / apply / merge / unmerge``) and the activation-hook front-end
(``jaxpeft.adapters.factored``) do everything model-specific -- selecting the targeted leaves, folding
their layout to a matrix, looping over stacked (scanned) layers, casting dtypes -- so a method only ever
sees **one float32 matrix** of shape ``(d_in, d_out)`` and its own adapter leaves for that matrix.

Kernel fold (``Target.fan_in_axes`` = number of leading input axes of one layer's leaf)
---------------------------------------------------------------------------------------
A layer's leaf of shape ``(i_1, ..., i_k, o_1, ..., o_m)`` is reshaped (row-major, no transpose) to the
matrix ``(i_1*...*i_k, o_1*...*o_m)``; the method's result is reshaped back. Flax layouts:

* ``Dense`` kernel ``(in, out)``: ``fan_in_axes=1`` (default for 2-D leaves).
* ``DenseGeneral`` q/k/v kernel ``(features, heads, head_dim)``: ``fan_in_axes=1`` -> ``(features, heads*head_dim)``.
* ``DenseGeneral`` attention-out kernel ``(heads, head_dim, features)``: ``fan_in_axes=2``.
* ``Embed`` table ``(vocab, features)`` (leaf named ``embedding``): ``fan_in_axes=1``; ``Target.kind ==
  "embedding"`` so a method can pick embedding-specific inits (PEFT reverses LoRA's init there).
* ``Conv`` kernel ``(kh, kw, in, out)`` (any spatial rank): ``fan_in_axes=ndim-1`` ->
  ``(kh*kw*in, out)``. This is PyTorch's conv ``weight.view(out, -1)`` transposed, up to the order of
  the folded input axes (torch: ``in, kh, kw``; Flax: ``kh, kw, in``).
* 1-D leaves (biases, scales): ``fan_in_axes=0`` -> ``(1, d)``.

Leaves of more than two axes are ambiguous (q/k/v vs. out vs. conv), so their ``fan_in_axes`` must be
given in the config's ``fan_in_axes`` pattern; stacked (scanned) leading layer axes are declared with
``stacked_axes`` and never reach the method (the front-ends ``vmap`` over them).

How to add a method
-------------------
Write ``jaxpeft/adapters/methods/<name>.py`` with the math and the paper in the module docstring::

    from jaxpeft.adapters.core import AdapterMethod, Target, register_method

    @register_method("scaled_identity")            # config.method == "scaled_identity"
    class ScaledIdentity(AdapterMethod):
        '''W' = W + c * I (toy example; needs d_in == d_out).'''

        option_defaults = {"c_init": 0.0}          # allowed keys of config.options and their defaults

        def validate(self, target: Target) -> None:
            d_in, d_out = target.matrix_shape
            if d_in != d_out:
                raise ValueError(f"{target.path}: scaled_identity needs a square kernel, got {target.shape}.")

        def init(self, rng, kernel, target):       # kernel: float32 (d_in, d_out), already folded
            return {"c": jnp.full((), target.option("c_init"), jnp.float32)}

        def delta(self, leaves, target):           # linear update => apply, merge, unmerge for free
            return leaves["c"] * jnp.eye(target.matrix_shape[0], dtype=jnp.float32)

and import it in ``jaxpeft/adapters/methods/__init__.py``: ``get_method`` and ``list_methods`` import that
package on first use, so the built-in methods need no explicit import. A method whose update is not
``kernel + delta`` (DoRA)
overrides ``apply`` (and ``unmerge``, or makes it raise with the reason). A method that also supports the
activation-hook mode implements ``branch``. Leaves are arrays of the *per-layer* shape (float32 for
trained ones); their names must not contain "/". Leaves that are stored and checkpointed but never trained
(e.g. saved random projections) are listed in ``frozen_leaves``: the front-ends stop their gradients and
``partition.optimizer_labels`` labels them ``"frozen"``.

A method whose update also changes the layer's bias (``(IA)^3`` rescales the whole output ``l * (x W + b)``;
Hydra's sequential branch reads the biased output) sets ``adapts_bias = True`` and implements
``apply_bias`` / ``unmerge_bias`` on the bias folded to a float32 ``(d_out,)`` vector::

    adapts_bias = True

    def apply_bias(self, bias, leaves, target):    # bias: float32 (d_out,) -> the adapted bias
        return leaves["l"] * bias

    def unmerge_bias(self, merged_bias, leaves, target):
        return merged_bias / leaves["l"]

The bias is the kernel's sibling leaf named ``bias`` (Flax ``Dense``, ``DenseGeneral``, ``Conv``); target
selection records its path in ``Target.bias_path`` (``None`` when the layer has no bias -- then the hooks are
not called, and ``init`` can read ``target.bias_path`` to skip bias-only leaves). The front-ends handle the
rest: ``reparam`` updates the bias leaf in ``apply / merge / unmerge`` (stacked axes, dtypes) and the
activation-hook mode adds the constant ``apply_bias(b) - b`` to ``branch``'s output, so ``branch`` stays the
input-dependent part ``x (W' - W)``.

Optional declarative hooks (one name each; the harness and the PEFT code ask the method, never name it)
------------------------------------------------------------------------------------------------------
Class attributes:

* ``inits``: the ``config.init`` values the method accepts (checked before ``validate``; None: no check);
* ``needs_matrix``: refuse leaves without input axes (biases, scales) with one clear error;
* ``layout``: the one per-layer leaf layout the method adapts, a key of ``LAYOUTS`` (``"bias"``, ``"vector"``,
  ``"dense"``, ``"conv"``, ``"square_conv2d"``, ``"windowed"``); other leaves are refused with one error that
  names the layout, the leaf's shape and ``fan_in_axes``, followed by the method's ``layout_hint``;
* ``bounded_rank``: refuse ``rank > min(d_in, d_out)`` (a wider factor adds parameters, not expressiveness);
* ``frozen_leaves``: stored, never trained (no gradient, no optimizer state);
* ``no_decay_leaves``: trained without weight decay (the harness gives them its optimizer built with
  ``weight_decay=0``);
* ``peft``: a ``jaxpeft.adapters.peft_mapping.PeftMapping`` (PEFT type, layer kinds, tensor rules, config
  fields), which makes ``export_peft`` / ``import_peft`` work for the method.

Methods (``has_hook(method, name)`` tells whether one is implemented):

* ``loss_term(config, **config.adapter.penalty) -> term(base_params, adapter_params, rng)``: added to the loss;
* ``update_rule(config, **config.adapter.update) -> optax.GradientTransformation``: chained after the
  optimizer on the adapter tree;
* ``reselect(base_params, adapter_params, config)``: the between-steps rewrite (every
  ``config.adapter.reselect_every`` steps; the optimizer state restarts);
* ``calibrate(apply_fn, base_params, batches, config)`` + ``calibrated_init(config, base_params,
  calibration)``: an init that reads activations of training batches;
* ``trained_count(leaves)``: the scalars training changes in one target's leaves (default: the non-frozen ones).

A method is therefore its file (``jaxpeft/adapters/methods/<name>.py``, imported in
``jaxpeft/adapters/methods/__init__.py``) plus its test (``tests/adapters/methods/<name>_test.py``) and a case
in ``tests/adapters/conformance_test.py``; ``tests/train/new_method_test.py`` registers one from a test file.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

Leaves = dict[str, jax.Array]
PyTree = Any
# loss_term(base_params, adapter_params, rng) -> scalar added to the training loss.
LossTerm = Callable[[PyTree, PyTree, jax.Array], jax.Array]

_REGISTRY: dict[str, type["AdapterMethod"]] = {}


@dataclasses.dataclass(frozen=True)
class Target:
  """Everything a method needs to know about one targeted leaf (resolved from the config).

  Attributes:
    path: the leaf's '/'-joined parameter path, e.g. ``"encoder/layer_0/query/kernel"``.
    shape: the full leaf shape, stacked axes included.
    dtype: the base leaf's dtype name (``"float32"``, ``"bfloat16"``...).
    stacked_axes: number of leading stacked-layer axes (``nn.scan`` / ``nnx.scan``), handled by the core.
    fan_in_axes: number of input axes of one layer's leaf (see the module docstring).
    kind: ``"embedding"`` for leaves named ``embedding`` (Flax ``Embed``), else ``"kernel"``.
    rank, alpha: after ``rank_pattern`` / ``alpha_pattern``.
    use_rslora: scaling ``alpha/sqrt(rank)`` instead of ``alpha/rank``.
    dropout: adapter-branch input dropout rate (activation-hook mode only).
    init: the init scheme name (method-specific, e.g. ``"default"``, ``"gaussian"``, ``"pissa"``).
    options: the method's options (``option_defaults`` updated by ``config.options``), as sorted pairs.
    bias_path: for methods with ``adapts_bias``, the path of the layer's bias (the sibling leaf ``bias``),
      or ``None`` when the layer has none; always ``None`` for other methods.
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  stacked_axes: int
  fan_in_axes: int
  kind: str
  rank: int
  alpha: float
  use_rslora: bool
  dropout: float
  init: str
  options: tuple[tuple[str, Any], ...] = ()
  bias_path: str | None = None

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """Shape of one layer's leaf (stacked axes removed)."""
    return self.shape[self.stacked_axes :]

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """Shape of the stacked-layer axes (``()`` when not stacked)."""
    return self.shape[: self.stacked_axes]

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """``(d_in, d_out)`` of the folded per-layer matrix."""
    layer = self.layer_shape
    return math.prod(layer[: self.fan_in_axes]), math.prod(layer[self.fan_in_axes :])

  @property
  def scaling(self) -> float:
    """LoRA-style scale ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def option(self, name: str) -> Any:
    """The value of method option ``name`` (default or from ``config.options``)."""
    return dict(self.options)[name]


class AdapterMethod:
  """Base class of a reparameterization adapter acting on one ``(d_in, d_out)`` float32 matrix.

  Subclasses implement ``init`` and either ``delta`` (linear updates: ``W' = W + delta``) or ``apply``.
  All methods get per-layer, folded, float32 inputs and must be pure ``jnp`` code (they run under
  ``jit``, ``grad``, ``vmap`` and ``pmap``).
  """

  name: ClassVar[str] = ""
  option_defaults: ClassVar[Mapping[str, Any]] = {}
  frozen_leaves: ClassVar[frozenset[str]] = frozenset()
  no_decay_leaves: ClassVar[frozenset[str]] = frozenset()
  inits: ClassVar[tuple[str, ...] | None] = None
  needs_matrix: ClassVar[bool] = False
  layout: ClassVar[str | None] = None
  layout_hint: ClassVar[str] = ""
  bounded_rank: ClassVar[bool] = False
  adapts_bias: ClassVar[bool] = False
  peft: ClassVar[Any] = None  # a jaxpeft.adapters.peft_mapping.PeftMapping: the method's PEFT counterpart

  def check_target(self, target: Target) -> None:
    """The declarative checks (``needs_matrix``, ``layout``, ``inits``), ``validate``, then ``bounded_rank``."""
    if self.needs_matrix and target.fan_in_axes == 0:
      raise ValueError(
          f"{target.path}: {self.name} needs a kernel with input and output axes, but this "
          f"leaf of per-layer shape {target.layer_shape} has none (fan_in_axes=0). Exclude it "
          "from AdapterConfig.targets (biases: use BitFit)."
      )
    if self.layout is not None:
      fits, description = LAYOUTS[self.layout]
      if not fits(target):
        raise ValueError(
            f"{target.path}: {self.name} adapts {description}, got per-layer shape {target.layer_shape} with "
            f"fan_in_axes={target.fan_in_axes}.{' ' + self.layout_hint if self.layout_hint else ''}"
        )
    if self.inits is not None and target.init not in self.inits:
      if self.inits == ("default",):
        raise ValueError(f"{target.path}: {self.name} has only init='default', got {target.init!r}.")
      raise ValueError(
          f"{target.path}: unknown init {target.init!r} for {self.name}; expected one of " f"{self.inits}."
      )
    self.validate(target)
    if self.bounded_rank and target.rank > min(target.matrix_shape):
      raise ValueError(
          f"{target.path}: rank {target.rank} exceeds the layer's smaller dimension "
          f"min(d_in, d_out) = {min(target.matrix_shape)} (folded shape {target.matrix_shape}); "
          "use a smaller AdapterConfig.rank or a rank_pattern entry for this layer."
      )

  def validate(self, target: Target) -> None:
    """Raises ``ValueError`` naming ``target.path`` if the method cannot adapt this leaf."""

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    """Returns the adapter leaves for one layer; ``kernel`` is the folded float32 base matrix."""
    raise NotImplementedError(f"{type(self).__name__} must implement init().")

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    """The additive update ``Delta W`` of shape ``(d_in, d_out)`` (linear methods only)."""
    raise NotImplementedError(
        f"Method {self.name!r} has no additive update; it must override apply() and unmerge()."
    )

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    """The adapted matrix; default ``kernel + delta(leaves)``."""
    return kernel + self.delta(leaves, target)

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    """Inverse of ``apply`` given the adapter leaves; default ``merged - delta(leaves)``."""
    return merged - self.delta(leaves, target)

  def apply_bias(self, bias: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    """The adapted bias (``adapts_bias`` methods, layers with a bias); ``bias`` is float32 ``(d_out,)``."""
    return bias

  def unmerge_bias(self, merged_bias: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    """Inverse of ``apply_bias`` given the adapter leaves."""
    return merged_bias

  def modifies_base(self, target: Target) -> bool:
    """True if the init is meant to be paired with a residual base (PiSSA-style inits).

    Then the base must be replaced by ``unmerge(base, adapter)`` (``reparam.init_with_base`` does it).
    """
    return False

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    """Activation-hook mode: the output added to the base layer's output ``x @ kernel + bias``.

    For ``adapts_bias`` methods the front-end adds ``apply_bias(bias) - bias`` itself: ``branch`` returns
    only the input-dependent part.

    ``x`` is the (already dropped-out) input folded to ``(..., d_in)`` in float32; ``kernel`` the folded
    float32 base matrix. Returns ``(..., d_out)``. Optional: methods without it are reparam-only.
    """
    raise NotImplementedError(
        f"Method {self.name!r} has no activation-hook (factored) form; use reparam.apply instead."
    )

  # Training hooks: optional; the harness (``jaxpeft.train``) asks the method through them and never names it.
  # ``has_hook(method, name)`` says whether a method implements one.

  def loss_term(self, config: Any, **options: Any) -> LossTerm:
    """The method's term added to the training loss, built from ``config.adapter.penalty`` (``options``).

    ``config`` is the run's ``AdapterConfig``. Returns ``term(base_params, adapter_params, rng) -> scalar``.
    """
    raise NotImplementedError(f"Method {self.name!r} has no loss term.")

  def update_rule(self, config: Any, **options: Any) -> Any:
    """The method's own ``optax.GradientTransformation`` over the adapter tree, chained after the optimizer.

    Built from ``config.adapter.update`` (``options``); it must leave the leaves it does not rule unchanged
    (e.g. with ``optax.masked``).
    """
    raise NotImplementedError(f"Method {self.name!r} has no update rule.")

  def reselect(self, base_params: PyTree, adapter_params: PyTree, config: Any) -> tuple[PyTree, PyTree]:
    """The between-steps rewrite: ``(base_params, adapter_params)`` with the same model function.

    Run every ``config.adapter.reselect_every`` steps; the caller restarts the optimizer state.
    """
    raise NotImplementedError(f"Method {self.name!r} has no between-steps re-selection.")

  def calibrate(
      self, apply_fn: Callable[[PyTree, Any], Any], base_params: PyTree, batches: Iterable[Any], config: Any
  ) -> PyTree:
    """What the calibrated init reads from data; ``apply_fn(params, batch)`` runs the model on a batch."""
    raise NotImplementedError(f"Method {self.name!r} has no calibrated init.")

  def calibrated_init(self, config: Any, base_params: PyTree, calibration: PyTree) -> tuple[PyTree, PyTree]:
    """``(base_params, adapter_params)`` from ``calibrate``'s result (the base may become a residual)."""
    raise NotImplementedError(f"Method {self.name!r} has no calibrated init.")

  def trained_count(self, leaves: Leaves) -> int:
    """Scalars training can change in one target's leaves (stacked layers included).

    Default: the sizes of the leaves not in ``frozen_leaves``.
    """
    return sum(int(v.size) for k, v in leaves.items() if k not in self.frozen_leaves)


def _windowed(target: Target) -> bool:
  spatial = target.option("spatial_axes")
  return target.fan_in_axes > 0 and (not spatial or target.fan_in_axes == spatial + 1)


# The per-layer leaf layouts a method can require (``AdapterMethod.layout``): name -> (test, what it is).
LAYOUTS: dict[str, tuple[Callable[[Target], bool], str]] = {
    "bias": (lambda t: t.fan_in_axes == 0, "a leaf without input axes (a bias or a scale; fan_in_axes=0)"),
    "vector": (
        lambda t: t.fan_in_axes == 0 and len(t.layer_shape) == 1,
        "a 1-D leaf (a bias or a scale; fan_in_axes=0)",
    ),
    "dense": (
        lambda t: t.fan_in_axes == 1 and len(t.layer_shape) == 2,
        "a 2-D Dense kernel (in, out) with fan_in_axes=1",
    ),
    "conv": (
        lambda t: len(t.layer_shape) >= 2 and t.fan_in_axes == len(t.layer_shape) - 1,
        "a kernel laid out as (spatial..., in, out) with fan_in_axes = ndim - 1 (Flax Conv/Dense); set "
        "AdapterConfig.fan_in_axes={pattern: ndim - 1} for conv kernels",
    ),
    "square_conv2d": (
        lambda t: len(t.layer_shape) == 4 and t.layer_shape[0] == t.layer_shape[1] and t.fan_in_axes == 3,
        "square 2-D conv kernels (kh, kw, in, out) with kh == kw and fan_in_axes=3; set "
        "AdapterConfig.fan_in_axes={pattern: 3} for conv kernels",
    ),
    "windowed": (
        _windowed,
        "a kernel with input axes (Dense), or with options spatial_axes > 0 a conv kernel (window axes, c_in, "
        "c_out) with fan_in_axes = spatial_axes + 1",
    ),
}


def register_method(name: str):
  """Class decorator registering an ``AdapterMethod`` subclass under ``name`` (``config.method``)."""

  def decorator(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    if not (isinstance(cls, type) and issubclass(cls, AdapterMethod)):
      raise TypeError(f"register_method({name!r}) expects an AdapterMethod subclass, got {cls!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"Adapter method {name!r} is already registered by {_REGISTRY[name]!r}.")
    if cls.layout is not None and cls.layout not in LAYOUTS:
      raise ValueError(f"{cls.__name__}.layout = {cls.layout!r} is not one of the layouts {sorted(LAYOUTS)}.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return decorator


def _import_methods() -> None:
  """Imports every built-in method module, so that the registry lists them all."""
  importlib.import_module("jaxpeft.adapters.methods")


def list_methods() -> list[str]:
  """The names of every registered adapter method (the built-in ones and any registered since), sorted."""
  _import_methods()
  return sorted(_REGISTRY)


def get_method(name: str) -> AdapterMethod:
  """An instance of the method registered as ``name`` (built-in methods are imported on first use)."""
  if name not in _REGISTRY:
    _import_methods()
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown adapter method {name!r}. Registered methods: {sorted(_REGISTRY)}. A new method is an "
        "AdapterMethod subclass decorated with @register_method(name) (see jaxpeft.adapters.core)."
    )
  return _REGISTRY[name]()


HOOKS = ("loss_term", "update_rule", "reselect", "calibrate", "calibrated_init")


def has_hook(method: AdapterMethod, hook: str) -> bool:
  """Whether ``method`` implements the optional training hook ``hook`` (one of ``HOOKS``)."""
  if hook not in HOOKS:
    raise ValueError(f"Unknown hook {hook!r}; the optional training hooks are {HOOKS}.")
  return getattr(type(method), hook) is not getattr(AdapterMethod, hook)


def stop_frozen(method: AdapterMethod, leaves: Leaves) -> Leaves:
  """``leaves`` with ``stop_gradient`` on the method's ``frozen_leaves``."""
  return {k: jax.lax.stop_gradient(v) if k in method.frozen_leaves else v for k, v in leaves.items()}


def fold(leaf: jax.Array, target: Target) -> jax.Array:
  """One layer's leaf -> float32 ``(d_in, d_out)`` matrix."""
  return leaf.reshape(target.matrix_shape).astype(jnp.float32)


def unfold(matrix: jax.Array, target: Target) -> jax.Array:
  """Float32 ``(d_in, d_out)`` matrix -> one layer's leaf in the base dtype."""
  return matrix.reshape(target.layer_shape).astype(target.dtype)


def fold_bias(bias: jax.Array) -> jax.Array:
  """One layer's bias (e.g. DenseGeneral ``(heads, head_dim)``) -> float32 ``(d_out,)``."""
  return bias.reshape(-1).astype(jnp.float32)


def unfold_bias(vector: jax.Array, like: jax.Array) -> jax.Array:
  """Float32 ``(d_out,)`` -> one layer's bias with the shape and dtype of ``like``."""
  return vector.reshape(like.shape).astype(like.dtype)
