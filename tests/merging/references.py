"""Shared test data and the reference merges: PEFT's merge_utils and mergekit's merge methods, per tensor."""

import dataclasses

import mergekit.merge_methods.base as mk_base
import mergekit.merge_methods.generalized_task_arithmetic as mk_gta
import numpy as np
import torch
from flax import traverse_util
from mergekit.merge_methods import linear as mk_linear
from mergekit.merge_methods.registry import registered_methods

SHAPES = {"dense/kernel": (6, 5), "dense/bias": (5,), "out/kernel": (5, 3)}
WEIGHTS = [0.7, 1.3, -0.4]


def trees(seed: int = 0, n: int = 3):
  """``base, [fine-tuned models]`` as nested dicts of float32 numpy arrays (task vectors of mixed sign)."""
  rng = np.random.default_rng(seed)
  flat_base = {p: rng.normal(size=s).astype(np.float32) for p, s in SHAPES.items()}
  flat_models = [
      {p: (v + rng.normal(size=v.shape) * (i + 1) / 2).astype(np.float32) for p, v in flat_base.items()}
      for i in range(n)
  ]
  unflat = lambda flat: traverse_util.unflatten_dict(flat, sep="/")
  return unflat(flat_base), [unflat(m) for m in flat_models]


def flat(tree):
  return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(tree, sep="/").items()}


def task_tensors(base, models, path):
  return [torch.tensor(flat(m)[path] - flat(base)[path]) for m in models]


def mergekit_method(
    name: str, base: np.ndarray, tensors: list[np.ndarray], consensus: str | None = None, **parameters
) -> np.ndarray:
  """mergekit 0.1.5's generalized-task-arithmetic method ``name`` on one tensor (``base`` + fine-tuned).

  ``consensus`` ("sum" / "count") overrides the method's sign-consensus rule (mergekit's ``ConsensusMethod``).
  """
  method = next(m for m in registered_methods() if m.spec.name == name)
  if consensus is not None:
    method = dataclasses.replace(method, consensus_method=mk_gta.ConsensusMethod(consensus))
  entries = [mk_base.TensorEntry("base", torch.tensor(base), is_base=True)]
  entries += [mk_base.TensorEntry(f"m{i}", torch.tensor(t)) for i, t in enumerate(tensors)]
  per_model = {
      k: {f"m{i}": v for i, v in enumerate(parameters.pop(k))} for k in ("weight", "density") if k in parameters
  }
  defaults = {p.name: p.default for p in method.spec.parameters if p.name not in per_model}
  return method.merge_group(mk_base.TensorGroup(entries), **{**defaults, **parameters, **per_model}).numpy()


def mergekit_linear(tensors: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
  batch = mk_base.TensorBatch([torch.tensor(t)[None] for t in tensors])
  merged = mk_linear.linear_merge.implementation(batch, weight=torch.tensor([weights]), normalize=normalize)
  return merged[0].numpy()
