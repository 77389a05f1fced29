"""Hugging Face PEFT interop: export a jaxpeft adapter to PEFT's on-disk format, import a PEFT adapter.

PEFT's format (``PeftModel.save_pretrained`` / ``from_pretrained``) is a folder with

* ``adapter_config.json``: the PEFT config (``peft_type``, ``r``, ``lora_alpha``, ``target_modules``, ...);
* ``adapter_model.safetensors``: the adapter tensors in PyTorch layout, keyed
  ``base_model.model.<torch module name>.<PEFT parameter name>`` (the adapter name ``default`` is stripped),
  plus, for VeRA and RandLoRA, the shared random projections under ``base_model.<name>``.

Methods both libraries ship (jaxpeft ``config.method`` -> PEFT ``peft_type``): ``lora`` (also rsLoRA and
every LoRA init: they are just LoRA weights) and ``dora`` -> ``LORA`` (``use_dora``), ``loha`` -> ``LOHA``,
``lokr`` -> ``LOKR``, ``ia3`` -> ``IA3``, ``vera`` -> ``VERA``, ``randlora`` -> ``RANDLORA``. Other methods
have no PEFT counterpart and are refused with that list.

Module names. PEFT addresses a layer by its dotted torch module name, jaxpeft by the '/'-joined Flax path of
its kernel. ``module_name`` maps the kernel path to the module name; ``default_module_name`` drops the leaf
name and joins with '.' (``"encoder/lin/kernel"`` -> ``"encoder.lin"``; nnx ``"layers/0/kernel"`` ->
``"layers.0"``, as a torch ``ModuleList``); ``bert_module_name`` is ``jaxpeft.models.bert`` <->
``transformers.BertModel`` (``jaxpeft.models.hf_loader.hf_name`` without the tensor name; prefix it, e.g.
``lambda p: "bert." + bert_module_name(p)``, for ``BertForSequenceClassification``). Import inverts
``module_name`` over the leaves of ``base_params`` named ``kernel`` or ``embedding``.

Transposition rules. A jaxpeft method sees a layer's leaf folded to a ``(d_in, d_out)`` matrix ``K``
(``jaxpeft.adapters.core``); PyTorch stores ``W`` with the output axis first:

* ``Dense`` kernel ``(in, out)``: ``W = K.T`` (``nn.Linear.weight (out, in)``).
* ``DenseGeneral`` kernels fold first: q/k/v ``(features, heads, head_dim)`` (``fan_in_axes=1``) ->
  ``K (features, heads*head_dim)`` -> ``W = K.T (heads*head_dim, features)``; attention out
  ``(heads, head_dim, features)`` (``fan_in_axes=2``) -> ``W = K.T (features, heads*head_dim)``. Row-major
  folding keeps ``heads`` as the slow axis, which is how a torch ``Linear`` of ``heads*head_dim`` outputs is
  split into heads (``view(..., heads, head_dim)``).
* ``Embed`` table ``(vocab, features)``: the same array as ``nn.Embedding.weight``.
* ``Conv`` kernel ``(*window, c_in, c_out)`` (leaves matched by the ``conv`` regex; ``fan_in_axes =
  ndim - 1``): ``W = kernel.transpose(-1, -2, *window axes)``, i.e. ``(c_out, c_in, *window)``. Folded rows
  are ordered ``(window, c_in)`` in Flax and ``(c_in, window)`` in torch, so every input-side factor is
  unfolded and permuted the same way: ``x (prod(window)*c, k) -> x.reshape(*window, c, k)
  .transpose(k, c, *window)`` (``_input_side``; for a Dense layer this is just ``x.T``).

Per method, jaxpeft leaf -> PEFT tensor (``in(x)`` = ``_input_side`` above with ``c = c_in``)::

    lora/dora  a -> lora_A.weight = in(a) (r, c_in[, *window])     b -> lora_B.weight = b.T (out, r[, 1, 1])
               Embed: a -> lora_embedding_A = a.T (r, vocab)        b -> lora_embedding_B = b.T (features, r)
               m -> lora_magnitude_vector (out,)  (conv: (1, out, 1, 1))
    loha       a1, a2 -> hada_w1_b, hada_w2_b = in(a).reshape(r, -1)    b1, b2 -> hada_w1_a, hada_w2_a = b.T
    lokr       w1 -> lokr_w1 = w1.T     w1_a -> lokr_w1_b = w1_a.T     w1_b -> lokr_w1_a = w1_b.T
               w2_b -> lokr_w2_a = w2_b.T
               w2 -> lokr_w2 = in_d(w2) (b, d[, *window])  w2_a -> lokr_w2_b = in_d(w2_a).reshape(r, -1)
               (in_d: ``_input_side`` with ``c = d``, the second input factor of ``jaxpeft.adapters.methods.lokr``)
    ia3        l -> ia3_l: output mode (out, 1), feedforward mode (1, in); conv (1, c, 1, 1)
    vera       d -> vera_lambda_d,  b -> vera_lambda_b;  shared: proj_a.T, proj_b.T are the top-left slices
               of base_model.vera_A (r, max in) and base_model.vera_B (max out, r)
    randlora   lam -> randlora_lambda,  gamma -> randlora_gamma;  shared: basis_a is
               base_model.randlora_A[:, 0, :n] (r, 1, n_max), basis_b is base_model.randlora_B[:D, :N] (D_max, N_max, r)

Import inverts each rule exactly: the rule is applied to an index array (``np.arange``) of the leaf's shape,
which tells where every leaf entry sits in the PEFT tensor.

Config fields. ``rank_pattern`` / ``alpha_pattern`` become PEFT's per-module patterns keyed ``^<escaped module
name>`` (PEFT matches ``(.*\\.)?(key)$``, so the ``^`` makes each key match exactly one module);
``target_modules`` is written as a regex of the exact module names (PEFT ``re.fullmatch``es a string).
PEFT has rsLoRA for LoRA/DoRA only: for the other methods ``use_rslora`` is folded into ``alpha``
(``alpha * sqrt(r)``, per module), which gives the same scale ``alpha / sqrt(r)``. Import reads
``r``/``lora_alpha``/``alpha``/``randlora_alpha``, the patterns (PEFT's first-match rule), ``use_rslora``,
``use_dora``, ``lora_dropout``, ``decompose_both``/``decompose_factor``, ``feedforward_modules``, ``d_initial``,
``sparse``/``very_sparse``; the adapted modules are the ones present in the tensor file. Fields PEFT writes
that jaxpeft cannot honour (``lora_bias``, ``use_effective_conv2d``, ``modules_to_save``, ``fan_in_fan_out``,
...) are an error when set. Training-only regularisers (LoHa/LoKr ``rank_dropout``, ``module_dropout``) do
not change outputs and are not imported.

Deviations and limits:
* VeRA/RandLoRA projections: jaxpeft stores a slice per target; export rebuilds PEFT's single shared buffer
  from the slices and refuses targets whose slices disagree (build the adapter with one ``projection_shape``,
  the elementwise maximum, as ``jaxpeft.adapters.methods.vera`` explains). RandLoRA's shared buffer may be larger
  than every slice any target uses (PEFT sizes it from the largest in/out dimensions separately); entries no
  layer reads are written as zeros. PEFT checkpoints saved with ``save_projection=False`` cannot be imported
  (their projections are ``torch.Generator`` draws).
* PiSSA-initialised LoRA adapters are exported as plain LoRA weights: load them onto a torch model holding
  the residual base that ``reparam.init_with_base`` returned (``export_merged`` of it writes one). The other
  way, a PEFT PiSSA/OLoRA/CorDA adapter saved without ``path_initial_model_for_weight_conversion`` needs the
  residual base as ``base_params``.
* Tensors are written in float32 (PEFT casts them to the model's dtype on load); import reads any dtype
  and returns float32 leaves.
* Stacked (scanned) targets are refused: torch has one module per layer; unstack the parameters first.

``export_merged`` writes the full merged model as a PyTorch state dict (``<module>.weight``/``.bias``) in
``.safetensors``, for serving without any adapter code (``model.load_state_dict``);
``jaxpeft.train.export`` writes the merged tree as an Orbax checkpoint for JAX instead.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy
from flax import traverse_util

from jaxpeft.adapters.checkpoint import check_adapter
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import Target
from jaxpeft.adapters.methods.ia3 import is_feedforward
from jaxpeft.adapters.methods.lokr import kron_shapes
from jaxpeft.adapters.reparam import AdapterParams, adapter_leaves, init_with_base, merge
from jaxpeft.adapters.selection import named_leaves, select_targets
from jaxpeft.models.hf_loader import hf_name

ModuleName = Callable[[str], str]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SHARED_PREFIX = "base_model."

# jaxpeft method -> (PEFT peft_type, layer kinds PEFT supports for it).
_PEFT_METHODS = {
    "lora": ("LORA", ("linear", "conv", "embedding")),
    "dora": ("LORA", ("linear", "conv", "embedding")),
    "loha": ("LOHA", ("linear", "conv")),
    "lokr": ("LOKR", ("linear", "conv")),
    "ia3": ("IA3", ("linear", "conv")),
    "vera": ("VERA", ("linear",)),
    "randlora": ("RANDLORA", ("linear",)),
}
# PEFT config fields jaxpeft cannot honour, with the value that means "off".
_UNSUPPORTED_FIELDS = {
    "lora_bias": False, "use_effective_conv2d": False, "modules_to_save": None, "fan_in_fan_out": False,
    "use_qalora": False, "use_bdlora": None, "layer_replication": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "target_parameters": None, "bias": "none",
}
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_MAX_LISTED = 20


def default_module_name(path: str) -> str:
    """Torch module name of a Flax kernel path: the leaf name dropped, '/' -> '.' (``"a/b/kernel"`` -> ``"a.b"``)."""
    return ".".join(path.split("/")[:-1])


def bert_module_name(path: str) -> str:
    """``jaxpeft.models.bert`` kernel path -> ``transformers.BertModel`` module name (via ``hf_loader.hf_name``)."""
    return hf_name(path).rsplit(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one target's layer looks in PyTorch: ``kind`` linear / conv / embedding, conv ``window``."""

    kind: str
    window: tuple[int, ...]
    c_in: int
    d_out: int


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One jaxpeft leaf -> one PEFT tensor (``shared``: a slice of a model-level buffer)."""

    peft_name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    shared: bool = False


def _input_side(x: np.ndarray, window: tuple[int, ...], channels: int) -> np.ndarray:
    """``(prod(window)*channels, k)`` with rows ordered (window, channels) -> torch ``(k, channels, *window)``."""
    nw = len(window)
    return x.reshape(*window, channels, -1).transpose(nw + 1, nw, *range(nw))


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _rules(method: str, layout: _Layout, *, lokr_d: int = 1, feedforward: bool = False) -> dict[str, _Rule]:
    """jaxpeft leaf name -> rule, for every leaf the method can have on a layer (module docstring table).

    ``lokr_d``: LoKr's second input factor ``d``; ``feedforward``: an (IA)^3 target in feedforward mode.
    """
    ones = (1,) * len(layout.window)
    conv = layout.kind == "conv"
    if method in ("lora", "dora"):
        if layout.kind == "embedding":
            rules = {"a": _Rule("lora_embedding_A", _transpose), "b": _Rule("lora_embedding_B", _transpose)}
        else:
            rules = {"a": _Rule("lora_A.weight", lambda x: _input_side(x, layout.window, layout.c_in)),
                     "b": _Rule("lora_B.weight", lambda x: x.T.reshape(layout.d_out, -1, *ones))}
        rules["m"] = _Rule("lora_magnitude_vector", lambda x: x.reshape((1, -1, *ones) if conv else (-1,)))
        return rules
    if method == "loha":
        a_side = lambda x: _flat(_input_side(x, layout.window, layout.c_in))
        return {"a1": _Rule("hada_w1_b", a_side), "b1": _Rule("hada_w1_a", _transpose),
                "a2": _Rule("hada_w2_b", a_side), "b2": _Rule("hada_w2_a", _transpose)}
    if method == "lokr":
        return {"w1": _Rule("lokr_w1", _transpose), "w1_a": _Rule("lokr_w1_b", _transpose),
                "w1_b": _Rule("lokr_w1_a", _transpose), "w2_b": _Rule("lokr_w2_a", _transpose),
                "w2": _Rule("lokr_w2", lambda x: _input_side(x, layout.window, lokr_d)),
                "w2_a": _Rule("lokr_w2_b", lambda x: _flat(_input_side(x, layout.window, lokr_d)))}
    if method == "ia3":
        shape = (1, -1, *ones) if conv else ((1, -1) if feedforward else (-1, 1))
        return {"l": _Rule("ia3_l", lambda x: x.reshape(shape))}
    if method == "vera":
        return {"proj_a": _Rule("vera_A", _transpose, shared=True), "proj_b": _Rule("vera_B", _transpose, shared=True),
                "d": _Rule("vera_lambda_d", _same), "b": _Rule("vera_lambda_b", _same)}
    return {"basis_a": _Rule("randlora_A", lambda x: x[:, None, :], shared=True),
            "basis_b": _Rule("randlora_B", _same, shared=True),
            "lam": _Rule("randlora_lambda", _same), "gamma": _Rule("randlora_gamma", _same)}


def _target_rules(method: str, target: Target, conv: str | None) -> dict[str, _Rule]:
    return _rules(method, _layout(target, conv, method),
                  lokr_d=kron_shapes(target)["d"] if method == "lokr" else 1,
                  feedforward=method == "ia3" and is_feedforward(target))


def _check_method(method: str) -> str:
    if method not in _PEFT_METHODS:
        raise ValueError(f"Method {method!r} has no Hugging Face PEFT counterpart, so it cannot be exported to or "
                         f"imported from PEFT's format. Methods that can: {sorted(_PEFT_METHODS)}. Use "
                         "jaxpeft.adapters.save_adapter for a jaxpeft checkpoint, or export_merged for merged weights.")
    return _PEFT_METHODS[method][0]


def _layout(target: Target, conv: str | None, method: str) -> _Layout:
    layer = target.layer_shape
    if target.stacked_axes:
        raise ValueError(f"{target.path}: stacked (scanned) layers of shape {target.shape} have no single torch "
                         "module; unstack the parameters (one leaf per layer) before exporting to PEFT.")
    if target.kind == "embedding":
        layout = _Layout("embedding", (), *target.matrix_shape)
    elif conv is not None and re.fullmatch(conv, target.path):
        if len(layer) < 3 or target.fan_in_axes != len(layer) - 1:
            raise ValueError(f"{target.path}: matched by conv={conv!r}, so it must be a Flax Conv kernel "
                             f"(*window, c_in, c_out) with fan_in_axes=ndim-1, got shape {layer} and "
                             f"fan_in_axes={target.fan_in_axes}.")
        layout = _Layout("conv", tuple(layer[:-2]), layer[-2], layer[-1])
    else:
        layout = _Layout("linear", (), *target.matrix_shape)
    kinds = _PEFT_METHODS[method][1]
    if layout.kind not in kinds:
        raise ValueError(f"{target.path}: PEFT's {method!r} supports {kinds} layers, not {layout.kind!r}.")
    return layout


def _shared_shapes(method: str, targets: Sequence[Target]) -> dict[str, tuple[int, ...]]:
    """Shapes of PEFT's model-level buffers (sized from the largest in/out dimensions, as PEFT's ``_find_dim``)."""
    max_in = max(t.matrix_shape[0] for t in targets)
    max_out = max(t.matrix_shape[1] for t in targets)
    r = targets[0].rank
    if method == "vera":
        return {"vera_A": (r, max_in), "vera_B": (max_out, r)}
    if method == "randlora":
        n = min(max_in, max_out)
        return {"randlora_A": (r, 1, n), "randlora_B": (max(max_in, max_out), math.ceil(n / r), r)}
    return {}


def _assemble(name: str, shape: tuple[int, ...], pieces: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """PEFT's shared buffer from the per-target top-left slices (unused entries 0); the slices must agree."""
    buffer, filled = np.zeros(shape, np.float32), np.zeros(shape, bool)
    for path, piece in pieces:
        region = tuple(slice(0, s) for s in piece.shape)
        seen = filled[region]
        if not np.array_equal(buffer[region][seen], piece[seen]):
            raise ValueError(
                f"{path}: its frozen projection is not a slice of the same shared matrix as the other targets', "
                f"but PEFT stores one shared {name}. Create the adapter with the same options projection_seed "
                "and projection_shape (the elementwise maximum of the targets' folded shapes) for all targets.")
        buffer[region], filled[region] = piece, True
    return buffer


def _per_module(targets: Sequence[Target], value: Callable[[Target], Any], default: Any,
                modules: Mapping[str, str]) -> dict[str, Any]:
    """PEFT pattern dict ``{"^<module>": value}`` for the targets whose value differs from ``default``."""
    return {f"^{re.escape(modules[t.path])}": value(t) for t in targets if value(t) != default}


def _peft_alpha(alpha: float, rank: int, use_rslora: bool, rslora_native: bool) -> float:
    """PEFT's alpha giving jaxpeft's scale (rsLoRA folded into alpha where PEFT has no ``use_rslora``)."""
    return alpha * math.sqrt(rank) if use_rslora and not rslora_native else alpha


def _peft_config(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict[str, Any]:
    method = config.method
    names = [modules[t.path] for t in targets]
    out = {"peft_type": _check_method(method), "task_type": None, "base_model_name_or_path": None,
           "inference_mode": True, "target_modules": "|".join(re.escape(n) for n in names)}
    if method == "ia3":
        feedforward = [modules[t.path] for t in targets if is_feedforward(t)]
        return {**out, "feedforward_modules": "|".join(re.escape(n) for n in feedforward),
                "init_ia3_weights": True}
    options = dict(targets[0].options)
    if method in ("vera", "randlora"):
        alphas = {_peft_alpha(t.alpha, t.rank, t.use_rslora, False) for t in targets}
        alphas = alphas if method == "randlora" else set()
        if len({t.rank for t in targets}) > 1 or len(alphas) > 1:
            raise ValueError(f"PEFT's {method!r} has one rank (and alpha) for all layers; this adapter uses "
                             "per-target ranks or alphas (rank_pattern / alpha_pattern). Use a single rank.")
        out.update(r=targets[0].rank, save_projection=True, init_weights=True, projection_prng_key=0)
        if method == "vera":
            return {**out, "d_initial": options["d_initial"], "vera_dropout": config.dropout}
        return {**out, "randlora_alpha": alphas.pop(), "randlora_dropout": config.dropout,
                "sparse": options["basis"] == "sparse", "very_sparse": options["basis"] == "very_sparse"}
    rslora_native = method in ("lora", "dora")
    default_alpha = _peft_alpha(config.alpha, config.rank, config.use_rslora, rslora_native)
    alpha = lambda t: _peft_alpha(t.alpha, t.rank, t.use_rslora, rslora_native)
    out.update(r=config.rank, rank_pattern=_per_module(targets, lambda t: t.rank, config.rank, modules),
               alpha_pattern=_per_module(targets, alpha, default_alpha, modules))
    if rslora_native:
        return {**out, "lora_alpha": default_alpha, "use_rslora": config.use_rslora, "use_dora": method == "dora",
                "lora_dropout": config.dropout, "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False}
    out.update(alpha=default_alpha, init_weights=True, use_effective_conv2d=False, rank_dropout=0.0,
               module_dropout=0.0)
    if method == "lokr":
        out.update(decompose_both=options["decompose_both"], decompose_factor=options["decompose_factor"])
    return out


def _module_names(targets: Sequence[Target], module_name: ModuleName) -> dict[str, str]:
    modules = {t.path: module_name(t.path) for t in targets}
    clashes = sorted(m for m, n in collections.Counter(modules.values()).items() if n > 1)
    if clashes:
        raise ValueError(f"module_name maps several targets to the same torch module(s) {clashes}; it must give "
                         "each adapted kernel its own module name.")
    return modules


def export_peft(directory: str | os.PathLike, adapter: AdapterParams, config: AdapterConfig, base_params: Any, *,
                module_name: ModuleName = default_module_name, conv: str | None = None) -> None:
    """Writes ``adapter`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(torch_model, directory)`` then gives the outputs jaxpeft gives with
    ``reparam.apply(base_params, adapter, config)``, for a torch model holding the same base weights.

    Args:
      directory: output folder (created).
      adapter, config, base_params: the jaxpeft adapter, its config, and the base parameters it adapts.
      module_name: Flax kernel path -> torch module name (``default_module_name``, ``bert_module_name``).
      conv: regex (``re.fullmatch`` on Flax paths) of the Conv kernels ``(*window, c_in, c_out)``; other
        kernels are Dense / DenseGeneral (torch ``Linear``) or, for leaves named ``embedding``, Embedding.
    """
    _check_method(config.method)
    check_adapter(adapter, config, base_params)
    targets = select_targets(config, base_params)
    modules = _module_names(targets, module_name)
    by_path = adapter_leaves(adapter, targets)
    tensors: dict[str, np.ndarray] = {}
    shared: dict[str, list[tuple[str, np.ndarray]]] = {}
    for target in targets:
        rules = _target_rules(config.method, target, conv)
        for leaf_name, value in by_path[target.path].items():
            rule = rules[leaf_name]
            array = rule.to_torch(np.asarray(jnp.asarray(value, jnp.float32)))
            if rule.shared:
                shared.setdefault(rule.peft_name, []).append((target.path, array))
            else:
                tensors[f"{_PREFIX}{modules[target.path]}.{rule.peft_name}"] = array
    for name, shape in _shared_shapes(config.method, targets).items():
        tensors[f"{_SHARED_PREFIX}{name}"] = _assemble(name, shape, shared[name])
        if config.method == "randlora":  # PEFT also saves each RandLoRA layer's reference to the shared buffers
            tensors.update({f"{_PREFIX}{modules[t.path]}.{name}": tensors[f"{_SHARED_PREFIX}{name}"] for t in targets})
    peft_config = _peft_config(config, targets, modules)
    folder = pathlib.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                                str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def _is_peft_feedforward(spec: Any, module: str) -> bool:
    """PEFT's ``feedforward_modules`` rule: a string is ``re.fullmatch``ed, a list entry is a suffix of the name."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module.endswith(key) for key in spec)


def _peft_pattern(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` rule: the first key with ``re.match((.*\\.)?(key)$)`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _read_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    folder = pathlib.Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder} has no {name}; a PEFT adapter folder (PeftModel.save_pretrained with "
                                    "safe_serialization=True) holds adapter_config.json and adapter_model.safetensors.")
    peft_config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = {k: np.asarray(v.astype(jnp.float32))
               for k, v in safetensors.flax.load_file(str(folder / WEIGHTS_FILE)).items()}
    return peft_config, tensors


def _method_of(peft_config: Mapping[str, Any]) -> str:
    """The jaxpeft method of a PEFT config; an error for PEFT types and options jaxpeft lacks."""
    peft_type = peft_config.get("peft_type")
    methods = {v[0]: k for k, v in _PEFT_METHODS.items() if k != "dora"}
    if peft_type not in methods:
        raise ValueError(f"PEFT type {peft_type!r} has no jaxpeft counterpart; importable types: {sorted(methods)}.")
    unsupported = {k: peft_config[k] for k, off in _UNSUPPORTED_FIELDS.items()
                   if peft_config.get(k, off) not in (off, None, False, [], {})}
    if unsupported:
        raise ValueError(f"This PEFT adapter uses options jaxpeft does not implement: {unsupported}.")
    if peft_type in ("VERA", "RANDLORA") and not peft_config.get("save_projection", True):
        raise ValueError(f"This {peft_type} adapter was saved with save_projection=False: its random projections "
                         "are torch.Generator draws that jaxpeft cannot reproduce. Re-save it in PEFT with "
                         "save_projection=True.")
    return "dora" if peft_type == "LORA" and peft_config.get("use_dora") else methods[peft_type]


def _adapted_modules(method: str, tensors: Mapping[str, np.ndarray]) -> list[str]:
    """The torch module names the tensor file adapts (keys ``base_model.model.<module>.<PEFT name>``)."""
    names = {rule.peft_name for kind in ("linear", "embedding")
             for rule in _rules(method, _Layout(kind, (), 1, 1)).values() if not rule.shared}
    modules = set()
    for key in tensors:
        for name in names:
            if key.startswith(_PREFIX) and key.endswith(f".{name}"):
                modules.add(key[len(_PREFIX):-len(name) - 1])
    return sorted(modules)


def import_peft(directory: str | os.PathLike, base_params: Any, *, module_name: ModuleName = default_module_name,
                conv: str | None = None, fan_in_axes: Mapping[str, int] | None = None
                ) -> tuple[AdapterParams, AdapterConfig]:
    """Reads a PEFT adapter folder as ``(adapter_params, AdapterConfig)`` for ``base_params``.

    Args:
      directory: a folder written by ``PeftModel.save_pretrained`` (or ``export_peft``).
      base_params: the Flax parameters of the model the adapter is for (same base weights as the torch model).
      module_name: Flax kernel path -> torch module name; inverted over the leaves of ``base_params``.
      conv: regex of the Conv kernels, as in ``export_peft``.
      fan_in_axes: ``AdapterConfig.fan_in_axes`` patterns for adapted DenseGeneral kernels (more than two axes).

    Raises:
      ValueError: one message listing adapted modules that ``base_params`` lacks, and PEFT tensors that are
        missing, unexpected or of the wrong shape.
    """
    peft_config, tensors = _read_folder(directory)
    method = _method_of(peft_config)
    candidates: dict[str, list[str]] = {}
    for path, leaf in named_leaves(base_params):
        if path.rsplit("/", 1)[-1] in ("kernel", "embedding"):
            candidates.setdefault(module_name(path), []).append(path)
    modules = _adapted_modules(method, tensors)
    unknown = [m for m in modules if m not in candidates]
    ambiguous = [f"{m}: {candidates[m]}" for m in modules if len(candidates.get(m, ())) > 1]
    if unknown or ambiguous:
        raise ValueError(
            "The PEFT adapter does not fit these base params: "
            + (f"modules not in the Flax model: {_listed(unknown)} (its modules, by module_name: "
               f"{_listed(sorted(candidates))}); " if unknown else "")
            + (f"modules mapped from several Flax leaves: {ambiguous}; " if ambiguous else "")
            + "pass the module_name that maps this model's kernel paths to the torch module names.")
    config = _jaxpeft_config(method, peft_config, {candidates[m][0]: m for m in modules}, base_params, conv,
                             fan_in_axes)
    return _import_leaves(method, config, tensors, base_params, module_name, conv), config


def _jaxpeft_config(method: str, peft_config: Mapping[str, Any], paths: Mapping[str, str], base_params: Any,
                    conv: str | None, fan_in_axes: Mapping[str, int] | None) -> AdapterConfig:
    """The AdapterConfig of a PEFT config for the adapted Flax paths (``paths``: Flax path -> module name)."""
    leaves = dict(named_leaves(base_params))
    conv_paths = [p for p in paths if conv is not None and re.fullmatch(conv, p)]
    fan_in = {**(fan_in_axes or {}), **{re.escape(p): leaves[p].ndim - 1 for p in conv_paths}}
    r = peft_config.get("r", 8)
    alpha = peft_config.get({"LORA": "lora_alpha", "RANDLORA": "randlora_alpha"}.get(peft_config["peft_type"],
                                                                                      "alpha"), 8.0)
    rank_pattern = {re.escape(p): _peft_pattern(peft_config.get("rank_pattern"), m, r) for p, m in paths.items()}
    alpha_pattern = {re.escape(p): _peft_pattern(peft_config.get("alpha_pattern"), m, alpha)
                     for p, m in paths.items()}
    options: dict[str, Any] = {}
    spatial = {leaves[p].ndim - 2 for p in conv_paths}
    if method in ("lokr", "ia3") and spatial:
        options["spatial_axes"] = spatial.pop()
    if method == "lokr":
        options.update(decompose_both=peft_config.get("decompose_both", False),
                       decompose_factor=peft_config.get("decompose_factor", -1))
    if method == "ia3":
        feedforward = [p for p, m in paths.items() if _is_peft_feedforward(peft_config.get("feedforward_modules"), m)]
        options["feedforward"] = "|".join(re.escape(p) for p in feedforward) or None
    if method == "vera":
        options["d_initial"] = peft_config.get("d_initial", 0.1)
    if method == "randlora":
        options["basis"] = ("very_sparse" if peft_config.get("very_sparse") else
                            "sparse" if peft_config.get("sparse") else "dense")
    dropout_key = {"lora": "lora_dropout", "dora": "lora_dropout", "vera": "vera_dropout",
                   "randlora": "randlora_dropout"}.get(method)
    config = AdapterConfig(
        targets="|".join(re.escape(p) for p in sorted(paths)), method=method, rank=r, alpha=alpha,
        dropout=peft_config.get(dropout_key, 0.0) if dropout_key else 0.0,
        use_rslora=bool(peft_config.get("use_rslora", False)),
        rank_pattern={k: v for k, v in rank_pattern.items() if v != r},
        alpha_pattern={k: v for k, v in alpha_pattern.items() if v != alpha}, fan_in_axes=fan_in, options=options)
    if method in ("vera", "randlora"):  # the shared projections' shape: the largest folded in/out dimensions
        targets = select_targets(config, base_params)
        shape = (max(t.matrix_shape[0] for t in targets), max(t.matrix_shape[1] for t in targets))
        config = dataclasses.replace(config, options={**options, "projection_shape": shape})
    return config


def _import_leaves(method: str, config: AdapterConfig, tensors: Mapping[str, np.ndarray], base_params: Any,
                   module_name: ModuleName, conv: str | None) -> AdapterParams:
    """The adapter pytree from PEFT tensors, inverting the export rules; one diff error on any mismatch."""
    targets = select_targets(config, base_params)
    _, expected = jax.eval_shape(lambda p: init_with_base(jax.random.key(0), config, p), base_params)
    expected = adapter_leaves(expected, targets)
    used, missing, wrong, by_path = set(), [], [], {}
    shared_shapes = _shared_shapes(method, targets)
    for target in targets:
        rules = _target_rules(method, target, conv)
        by_path[target.path] = {}
        for leaf_name, spec in expected[target.path].items():
            rule = rules[leaf_name]
            index = rule.to_torch(np.arange(math.prod(spec.shape)).reshape(spec.shape))
            key = (f"{_SHARED_PREFIX}{rule.peft_name}" if rule.shared
                   else f"{_PREFIX}{module_name(target.path)}.{rule.peft_name}")
            if key not in tensors:
                missing.append(key)
                continue
            used.add(key)
            tensor = tensors[key]
            want = shared_shapes[rule.peft_name] if rule.shared else index.shape
            if tensor.shape != tuple(want):
                wrong.append(f"{key}: {tensor.shape} in the file, {tuple(want)} expected for {target.path}")
                continue
            if rule.shared:
                tensor = tensor[tuple(slice(0, s) for s in index.shape)]
            leaf = np.empty(index.size, np.float32)
            leaf[index.reshape(-1)] = tensor.reshape(-1)
            by_path[target.path][leaf_name] = jnp.asarray(leaf.reshape(spec.shape))
    # PEFT also writes each RandLoRA layer's view of the shared buffers; they duplicate base_model.randlora_*.
    copies = {k for k in tensors if method == "randlora" and re.fullmatch(r".*\.randlora_[AB]", k)}
    unexpected = sorted(set(tensors) - used - copies)
    if missing or unexpected or wrong:
        raise ValueError(
            f"The PEFT {method!r} adapter does not fit these base params and options: "
            f"missing tensors: [{_listed(sorted(missing))}]; unexpected tensors: [{_listed(unexpected)}]; "
            f"wrong shapes: [{_listed(wrong)}]. Check module_name, conv and the PEFT config (r, rank_pattern, "
            "decompose_both, ...).")
    return traverse_util.unflatten_dict(
        {(*path.split("/"), name): leaf for path, leaves in by_path.items() for name, leaf in leaves.items()})


def _torch_tensor(path: str, leaf: np.ndarray, config: AdapterConfig, conv: str | None) -> np.ndarray:
    """One merged leaf in PyTorch layout (kernels transposed / permuted, biases flattened)."""
    name = path.rsplit("/", 1)[-1]
    if name == "bias":
        return leaf.reshape(-1)
    if name != "kernel":
        return leaf
    if conv is not None and re.fullmatch(conv, path):
        return leaf.transpose(leaf.ndim - 1, leaf.ndim - 2, *range(leaf.ndim - 2))
    fan_in = config.pattern_value("fan_in_axes", path, 1 if leaf.ndim == 2 else None)
    if fan_in is None:
        raise ValueError(f"{path}: kernel of shape {leaf.shape} has more than two axes; give its input axes in "
                         "AdapterConfig.fan_in_axes (DenseGeneral) or match it by conv= (Conv).")
    return leaf.reshape(math.prod(leaf.shape[:fan_in]), -1).T


def export_merged(path: str | os.PathLike, base_params: Any, adapter: AdapterParams, config: AdapterConfig, *,
                  module_name: ModuleName = default_module_name, conv: str | None = None) -> None:
    """Writes the merged model (``reparam.merge``) as a PyTorch state dict in one ``.safetensors`` file.

    Tensor names are ``module_name(path) + "." + {kernel, embedding, scale: weight; bias: bias}[leaf]`` (other
    leaf names are kept); kernels are transposed to torch layout (module docstring), DenseGeneral biases
    flattened. ``torch_model.load_state_dict(safetensors.torch.load_file(path), strict=False)`` loads it;
    the result equals PEFT's ``merge_and_unload()`` of the same adapter.
    """
    merged = merge(base_params, adapter, config)
    tensors = {}
    for leaf_path, leaf in named_leaves(merged):
        leaf_name = leaf_path.rsplit("/", 1)[-1]
        name = f"{module_name(leaf_path)}.{_TORCH_LEAF.get(leaf_name, leaf_name)}"
        if name in tensors:
            raise ValueError(f"module_name maps two leaves to the torch tensor {name!r} (second: {leaf_path}).")
        tensors[name] = np.ascontiguousarray(
            _torch_tensor(leaf_path, np.asarray(jnp.asarray(leaf, jnp.float32)), config, conv))
    safetensors.numpy.save_file(tensors, os.fspath(path), metadata={"format": "pt"})
