"""Hugging Face PEFT interop: export a jaxpeft adapter to PEFT's on-disk format, import a PEFT adapter.

PEFT's format (``PeftModel.save_pretrained`` / ``from_pretrained``) is a folder with

* ``adapter_config.json``: the PEFT config (``peft_type``, ``r``, ``target_modules``, ...);
* ``adapter_model.safetensors``: the adapter tensors in PyTorch layout, keyed
  ``base_model.model.<torch module name>.<PEFT parameter name>`` (the adapter name ``default`` is stripped),
  plus model-level shared buffers (random projections) under ``base_model.<name>``.

Which methods have a PEFT counterpart, and how, is declared by each method in its own file
(``AdapterMethod.peft``, a ``jaxpeft.adapters.peft_mapping.PeftMapping``: PEFT type, layer kinds, one rule per
leaf, config fields both ways, shared buffers). This module is the generic machinery: module names, the
layouts and transpositions below, writing and reading folders, inverting the rules, and one diff error on
import. Methods without a mapping are refused with the list of those that have one.

Module names. PEFT addresses a layer by its dotted torch module name, jaxpeft by the '/'-joined Flax path of
its kernel. ``module_name`` maps the kernel path to the module name; ``default_module_name`` drops the leaf
name and joins with '.' (``"encoder/lin/kernel"`` -> ``"encoder.lin"``; nnx ``"layers/0/kernel"`` ->
``"layers.0"``, as a torch ``ModuleList``). Model-specific names live with the model (e.g.
``jaxpeft.models.hf_loader.bert_module_name``). Import inverts ``module_name`` over the leaves of
``base_params`` named ``kernel`` or ``embedding``.

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
  .transpose(k, c, *window)`` (``peft_mapping.input_side``; for a Dense layer this is just ``x.T``).

The per-leaf rules of each method are written beside its mapping. Import inverts each rule exactly: the rule
is applied to an index array (``np.arange``) of the leaf's shape, which tells where every leaf entry sits in
the PEFT tensor.

Config fields. ``rank_pattern`` / ``alpha_pattern`` become PEFT's per-module patterns keyed ``^<escaped module
name>`` (PEFT matches ``(.*\\.)?(key)$``, so the ``^`` makes each key match exactly one module);
``target_modules`` is written as a regex of the exact module names (PEFT ``re.fullmatch``es a string). Where
PEFT has no ``use_rslora`` for a method, it is folded into ``alpha`` (``alpha * sqrt(r)``, per module), which
gives the same scale ``alpha / sqrt(r)``. Import reads ``r``, the method's alpha and dropout fields, the
patterns (PEFT's first-match rule), ``use_rslora`` and the method's own fields; the adapted modules are the
ones present in the tensor file. Fields PEFT writes that jaxpeft cannot honour (``lora_bias``,
``use_effective_conv2d``, ``modules_to_save``, ``fan_in_fan_out``, ...) are an error when set. Training-only
regularisers (``rank_dropout``, ``module_dropout``) do not change outputs and are not imported.

Deviations and limits:
* Shared random projections: jaxpeft stores a slice per target; export rebuilds PEFT's single shared buffer
  from the slices and refuses targets whose slices disagree (build the adapter with one ``projection_shape``,
  the elementwise maximum). A shared buffer may be larger than every slice any target uses (PEFT sizes it
  from the largest in/out dimensions separately); entries no layer reads are written as zeros. PEFT
  checkpoints saved with ``save_projection=False`` cannot be imported (their projections are
  ``torch.Generator`` draws).
* Adapters with a residual-base init are exported as plain weights of their PEFT type: load them onto a torch
  model holding the residual base that ``reparam.init_with_base`` returned (``export_merged`` of it writes
  one). The other way, a PEFT adapter with such an init saved without
  ``path_initial_model_for_weight_conversion`` needs the residual base as ``base_params``.
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

from jaxpeft._messages import listed
from jaxpeft.adapters.checkpoint import check_adapter
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import Target, get_method, list_methods
from jaxpeft.adapters.peft_mapping import Layout, PeftMapping, Rule
from jaxpeft.adapters.reparam import AdapterParams, adapter_leaves, init_with_base, merge
from jaxpeft.adapters.selection import named_leaves, select_targets

ModuleName = Callable[[str], str]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SHARED_PREFIX = "base_model."

# PEFT config fields jaxpeft cannot honour, with the value that means "off".
_UNSUPPORTED_FIELDS = {
    "lora_bias": False,
    "use_effective_conv2d": False,
    "modules_to_save": None,
    "fan_in_fan_out": False,
    "use_qalora": False,
    "use_bdlora": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "target_parameters": None,
    "bias": "none",
}
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def default_module_name(path: str) -> str:
  """Torch module name of a Flax kernel path: the leaf name dropped, '/' -> '.' (``"a/b/kernel"`` -> ``"a.b"``)."""
  return ".".join(path.split("/")[:-1])


def _peft_methods() -> dict[str, PeftMapping]:
  """jaxpeft method -> its PEFT mapping, for every registered method that declares one."""
  return {name: get_method(name).peft for name in list_methods() if get_method(name).peft is not None}


def _mapping(method: str) -> PeftMapping:
  mapping = get_method(method).peft
  if mapping is None:
    raise ValueError(
        f"Method {method!r} has no Hugging Face PEFT counterpart, so it cannot be exported to or "
        f"imported from PEFT's format. Methods that can: {sorted(_peft_methods())}. Use "
        "jaxpeft.adapters.save_adapter for a jaxpeft checkpoint, or export_merged for merged weights."
    )
  return mapping


def _target_rules(mapping: PeftMapping, method: str, target: Target, conv: str | None) -> dict[str, Rule]:
  return mapping.rules(_layout(target, conv, method, mapping), target)


def _layout(target: Target, conv: str | None, method: str, mapping: PeftMapping) -> Layout:
  layer = target.layer_shape
  if target.stacked_axes:
    raise ValueError(
        f"{target.path}: stacked (scanned) layers of shape {target.shape} have no single torch "
        "module; unstack the parameters (one leaf per layer) before exporting to PEFT."
    )
  if target.kind == "embedding":
    layout = Layout("embedding", (), *target.matrix_shape)
  elif conv is not None and re.fullmatch(conv, target.path):
    if len(layer) < 3 or target.fan_in_axes != len(layer) - 1:
      raise ValueError(
          f"{target.path}: matched by conv={conv!r}, so it must be a Flax Conv kernel "
          f"(*window, c_in, c_out) with fan_in_axes=ndim-1, got shape {layer} and "
          f"fan_in_axes={target.fan_in_axes}."
      )
    layout = Layout("conv", tuple(layer[:-2]), layer[-2], layer[-1])
  else:
    layout = Layout("linear", (), *target.matrix_shape)
  kinds = mapping.layer_kinds
  if layout.kind not in kinds:
    raise ValueError(f"{target.path}: PEFT's {method!r} supports {kinds} layers, not {layout.kind!r}.")
  return layout


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
          "and projection_shape (the elementwise maximum of the targets' folded shapes) for all targets."
      )
    buffer[region], filled[region] = piece, True
  return buffer


def _peft_config(config: AdapterConfig, targets: Sequence[Target], modules: Mapping[str, str]) -> dict[str, Any]:
  mapping = _mapping(config.method)
  names = [modules[t.path] for t in targets]
  return {
      "peft_type": mapping.peft_type,
      "task_type": None,
      "base_model_name_or_path": None,
      "inference_mode": True,
      "target_modules": "|".join(re.escape(n) for n in names),
      **mapping.config_fields(config, targets, modules),
  }


def _module_names(targets: Sequence[Target], module_name: ModuleName) -> dict[str, str]:
  modules = {t.path: module_name(t.path) for t in targets}
  clashes = sorted(m for m, n in collections.Counter(modules.values()).items() if n > 1)
  if clashes:
    raise ValueError(
        f"module_name maps several targets to the same torch module(s) {clashes}; it must give "
        "each adapted kernel its own module name."
    )
  return modules


def export_peft(
    directory: str | os.PathLike,
    adapter: AdapterParams,
    config: AdapterConfig,
    base_params: Any,
    *,
    module_name: ModuleName = default_module_name,
    conv: str | None = None,
) -> None:
  """Writes ``adapter`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

  ``PeftModel.from_pretrained(torch_model, directory)`` then gives the outputs jaxpeft gives with
  ``reparam.apply(base_params, adapter, config)``, for a torch model holding the same base weights.

  Args:
    directory: output folder (created).
    adapter, config, base_params: the jaxpeft adapter, its config, and the base parameters it adapts.
    module_name: Flax kernel path -> torch module name (``default_module_name``, or the model's own).
    conv: regex (``re.fullmatch`` on Flax paths) of the Conv kernels ``(*window, c_in, c_out)``; other
      kernels are Dense / DenseGeneral (torch ``Linear``) or, for leaves named ``embedding``, Embedding.
  """
  mapping = _mapping(config.method)
  check_adapter(adapter, config, base_params)
  targets = select_targets(config, base_params)
  modules = _module_names(targets, module_name)
  by_path = adapter_leaves(adapter, targets)
  tensors: dict[str, np.ndarray] = {}
  shared: dict[str, list[tuple[str, np.ndarray]]] = {}
  for target in targets:
    rules = _target_rules(mapping, config.method, target, conv)
    for leaf_name, value in by_path[target.path].items():
      rule = rules[leaf_name]
      array = rule.to_torch(np.asarray(jnp.asarray(value, jnp.float32)))
      if rule.shared:
        shared.setdefault(rule.peft_name, []).append((target.path, array))
      else:
        tensors[f"{_PREFIX}{modules[target.path]}.{rule.peft_name}"] = array
  for name, shape in mapping.shared_shapes(targets).items():
    tensors[f"{_SHARED_PREFIX}{name}"] = _assemble(name, shape, shared[name])
    if mapping.layer_copies_of_shared:  # PEFT also saves each layer's reference to the shared buffers
      tensors.update({f"{_PREFIX}{modules[t.path]}.{name}": tensors[f"{_SHARED_PREFIX}{name}"] for t in targets})
  peft_config = _peft_config(config, targets, modules)
  folder = pathlib.Path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
  safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
      str(folder / WEIGHTS_FILE),
      metadata={"format": "pt"},
  )


def _peft_pattern(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
  """PEFT's ``rank_pattern`` / ``alpha_pattern`` rule: the first key with ``re.match((.*\\.)?(key)$)`` wins."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _read_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  folder = pathlib.Path(directory)
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (folder / name).exists():
      raise FileNotFoundError(
          f"{folder} has no {name}; a PEFT adapter folder (PeftModel.save_pretrained with "
          "safe_serialization=True) holds adapter_config.json and adapter_model.safetensors."
      )
  peft_config = json.loads((folder / CONFIG_FILE).read_text())
  tensors = {
      k: np.asarray(v.astype(jnp.float32))
      for k, v in safetensors.flax.load_file(str(folder / WEIGHTS_FILE)).items()
  }
  return peft_config, tensors


def _method_of(peft_config: Mapping[str, Any]) -> str:
  """The jaxpeft method of a PEFT config; an error for PEFT types and options jaxpeft lacks."""
  peft_type = peft_config.get("peft_type")
  mappings = _peft_methods()
  types = sorted({m.peft_type for m in mappings.values()})
  if peft_type not in types:
    raise ValueError(f"PEFT type {peft_type!r} has no jaxpeft counterpart; importable types: {types}.")
  unsupported = {
      k: peft_config[k]
      for k, off in _UNSUPPORTED_FIELDS.items()
      if peft_config.get(k, off) not in (off, None, False, [], {})
  }
  if unsupported:
    raise ValueError(f"This PEFT adapter uses options jaxpeft does not implement: {unsupported}.")
  if not peft_config.get("save_projection", True):
    raise ValueError(
        f"This {peft_type} adapter was saved with save_projection=False: its random projections "
        "are torch.Generator draws that jaxpeft cannot reproduce. Re-save it in PEFT with "
        "save_projection=True."
    )
  return next(name for name, m in sorted(mappings.items()) if m.peft_type == peft_type and m.claims(peft_config))


def _adapted_modules(method: str, tensors: Mapping[str, np.ndarray]) -> list[str]:
  """The torch module names the tensor file adapts (keys ``base_model.model.<module>.<PEFT name>``)."""
  names = {
      rule.peft_name
      for kind in ("linear", "embedding")
      for rule in _mapping(method).rules(Layout(kind, (), 1, 1), None).values()
      if not rule.shared
  }
  modules = set()
  for key in tensors:
    for name in names:
      if key.startswith(_PREFIX) and key.endswith(f".{name}"):
        modules.add(key[len(_PREFIX) : -len(name) - 1])
  return sorted(modules)


def import_peft(
    directory: str | os.PathLike,
    base_params: Any,
    *,
    module_name: ModuleName = default_module_name,
    conv: str | None = None,
    fan_in_axes: Mapping[str, int] | None = None,
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
        + (
            f"modules not in the Flax model: {listed(unknown)} (its modules, by module_name: "
            f"{listed(sorted(candidates))}); "
            if unknown
            else ""
        )
        + (f"modules mapped from several Flax leaves: {ambiguous}; " if ambiguous else "")
        + "pass the module_name that maps this model's kernel paths to the torch module names."
    )
  config = _jaxpeft_config(
      method, peft_config, {candidates[m][0]: m for m in modules}, base_params, conv, fan_in_axes
  )
  return _import_leaves(method, config, tensors, base_params, module_name, conv), config


def _jaxpeft_config(
    method: str,
    peft_config: Mapping[str, Any],
    paths: Mapping[str, str],
    base_params: Any,
    conv: str | None,
    fan_in_axes: Mapping[str, int] | None,
) -> AdapterConfig:
  """The AdapterConfig of a PEFT config for the adapted Flax paths (``paths``: Flax path -> module name)."""
  mapping = _mapping(method)
  leaves = dict(named_leaves(base_params))
  conv_paths = [p for p in paths if conv is not None and re.fullmatch(conv, p)]
  fan_in = {**(fan_in_axes or {}), **{re.escape(p): leaves[p].ndim - 1 for p in conv_paths}}
  r = peft_config.get("r", 8)
  alpha = peft_config.get(mapping.alpha_field, 8.0)
  rank_pattern = {re.escape(p): _peft_pattern(peft_config.get("rank_pattern"), m, r) for p, m in paths.items()}
  alpha_pattern = {
      re.escape(p): _peft_pattern(peft_config.get("alpha_pattern"), m, alpha) for p, m in paths.items()
  }
  options = mapping.import_options(peft_config, paths, leaves, conv_paths)
  config = AdapterConfig(
      targets="|".join(re.escape(p) for p in sorted(paths)),
      method=method,
      rank=r,
      alpha=alpha,
      dropout=peft_config.get(mapping.dropout_field, 0.0) if mapping.dropout_field else 0.0,
      use_rslora=bool(peft_config.get("use_rslora", False)),
      rank_pattern={k: v for k, v in rank_pattern.items() if v != r},
      alpha_pattern={k: v for k, v in alpha_pattern.items() if v != alpha},
      fan_in_axes=fan_in,
      options=options,
  )
  completed = mapping.complete_options(options, select_targets(config, base_params))
  return config if completed == options else dataclasses.replace(config, options=completed)


def _import_leaves(
    method: str,
    config: AdapterConfig,
    tensors: Mapping[str, np.ndarray],
    base_params: Any,
    module_name: ModuleName,
    conv: str | None,
) -> AdapterParams:
  """The adapter pytree from PEFT tensors, inverting the export rules; one diff error on any mismatch."""
  targets = select_targets(config, base_params)
  _, expected = jax.eval_shape(lambda p: init_with_base(jax.random.key(0), config, p), base_params)
  expected = adapter_leaves(expected, targets)
  used, missing, wrong, by_path = set(), [], [], {}
  mapping = _mapping(method)
  shared_shapes = mapping.shared_shapes(targets)
  for target in targets:
    rules = _target_rules(mapping, method, target, conv)
    by_path[target.path] = {}
    for leaf_name, spec in expected[target.path].items():
      rule = rules[leaf_name]
      index = rule.to_torch(np.arange(math.prod(spec.shape)).reshape(spec.shape))
      key = (
          f"{_SHARED_PREFIX}{rule.peft_name}"
          if rule.shared
          else f"{_PREFIX}{module_name(target.path)}.{rule.peft_name}"
      )
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
  # PEFT may also write each layer's view of the shared buffers; they duplicate base_model.<buffer>.
  copies = {
      k
      for k in tensors
      if mapping.layer_copies_of_shared and k.startswith(_PREFIX) and k.rpartition(".")[2] in shared_shapes
  }
  unexpected = sorted(set(tensors) - used - copies)
  if missing or unexpected or wrong:
    raise ValueError(
        f"The PEFT {method!r} adapter does not fit these base params and options: "
        f"missing tensors: [{listed(sorted(missing))}]; unexpected tensors: [{listed(unexpected)}]; "
        f"wrong shapes: [{listed(wrong)}]. Check module_name, conv and the PEFT config (r, rank_pattern, "
        "decompose_both, ...)."
    )
  return traverse_util.unflatten_dict(
      {(*path.split("/"), name): leaf for path, leaves in by_path.items() for name, leaf in leaves.items()}
  )


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
    raise ValueError(
        f"{path}: kernel of shape {leaf.shape} has more than two axes; give its input axes in "
        "AdapterConfig.fan_in_axes (DenseGeneral) or match it by conv= (Conv)."
    )
  return leaf.reshape(math.prod(leaf.shape[:fan_in]), -1).T


def export_merged(
    path: str | os.PathLike,
    base_params: Any,
    adapter: AdapterParams,
    config: AdapterConfig,
    *,
    module_name: ModuleName = default_module_name,
    conv: str | None = None,
) -> None:
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
        _torch_tensor(leaf_path, np.asarray(jnp.asarray(leaf, jnp.float32)), config, conv)
    )
  safetensors.numpy.save_file(tensors, os.fspath(path), metadata={"format": "pt"})
