"""TIES over parameter trees against PEFT's ``merge_utils.ties`` and mergekit's ``ties``, per leaf."""

import numpy as np
import peft.utils.merge_utils as peft_merge
import pytest
import torch

from jaxpeft import merging
from tests.merging import references as ref


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_paper_convention_equals_peft(method):
  base, models = ref.trees()
  got = ref.flat(merging.ties(base, models, ref.WEIGHTS, density=0.5, majority_sign_method=method))
  for path in ref.SHAPES:
    want = peft_merge.ties(
        ref.task_tensors(base, models, path), torch.tensor(ref.WEIGHTS), density=0.5, majority_sign_method=method
    ).numpy()
    np.testing.assert_allclose(got[path] - ref.flat(base)[path], want, atol=1e-6)


@pytest.mark.parametrize("method, consensus", [("total", "sum"), ("frequency", "count")])
def test_mergekit_convention_equals_mergekit(method, consensus):
  base, models = ref.trees(seed=1)
  densities = [0.1, 0.5, 0.8]  # 0.1 of the 5-entry bias keeps 0 entries in PEFT's rule, 1 in mergekit's
  got = ref.flat(
      merging.ties(
          base,
          models,
          ref.WEIGHTS,
          density=densities,
          scale=0.8,
          majority_sign_method=method,
          convention="mergekit",
      )
  )
  for path in ref.SHAPES:
    want = ref.mergekit_method(
        "ties",
        ref.flat(base)[path],
        [ref.flat(m)[path] for m in models],
        consensus,
        weight=ref.WEIGHTS,
        density=densities,
        **{"lambda": 0.8},
    )
    np.testing.assert_allclose(got[path], want, atol=1e-5)


def test_scanned_layers_rank_per_layer():
  rng = np.random.default_rng(3)
  deltas = [rng.normal(size=(3, 4, 5)).astype(np.float32) for _ in range(2)]
  got = np.asarray(merging.ties_deltas(deltas, [1.0, 0.5], 0.3, batch_dims=1))
  for k in range(3):
    want = peft_merge.ties([torch.tensor(d[k]) for d in deltas], torch.tensor([1.0, 0.5]), density=0.3).numpy()
    np.testing.assert_allclose(got[k], want, atol=1e-6)


def test_scanned_layers_in_a_tree_rank_per_layer_with_stacked_axes():
  rng = np.random.default_rng(4)
  base = {"layers": {"kernel": rng.normal(size=(3, 4, 5)).astype(np.float32)}, "head": rng.normal(size=(5,))}
  models = [
      {
          "layers": {"kernel": base["layers"]["kernel"] + rng.normal(size=(3, 4, 5)).astype(np.float32)},
          "head": base["head"] + rng.normal(size=(5,)),
      }
      for _ in range(2)
  ]
  got = merging.ties(base, models, [1.0, 0.5], 0.3, stacked_axes={"layers/.*": 1})
  for k in range(3):
    tensors = [torch.tensor(m["layers"]["kernel"][k] - base["layers"]["kernel"][k]) for m in models]
    want = peft_merge.ties(tensors, torch.tensor([1.0, 0.5]), density=0.3).numpy()
    np.testing.assert_allclose(
        np.asarray(got["layers"]["kernel"][k]) - base["layers"]["kernel"][k], want, atol=1e-6
    )
  head = peft_merge.ties(
      [torch.tensor(m["head"] - base["head"]) for m in models], torch.tensor([1.0, 0.5]), density=0.3
  ).numpy()
  np.testing.assert_allclose(np.asarray(got["head"]) - base["head"], head, atol=1e-6)
