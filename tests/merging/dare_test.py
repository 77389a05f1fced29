"""DARE with fixed masks against PEFT's ``dare_linear`` / ``dare_ties`` and mergekit's, per leaf.

The references draw their masks with ``torch.bernoulli``; the same seed redraws them here and they are
passed to ``merging.dare`` as ``masks``.
"""

import jax
import numpy as np
import peft.utils.merge_utils as peft_merge
import pytest
import torch
from flax import traverse_util

from jaxpeft import merging
from tests.merging import references as ref

DENSITY = 0.6


def _masks(base, models, seed):
  """Per model, a mask tree redrawn as the references draw it: per leaf, seed, then one draw per model."""
  flat = [{} for _ in models]
  for k, path in enumerate(sorted(ref.SHAPES)):
    torch.manual_seed(seed + k)
    for i, t in enumerate(ref.task_tensors(base, models, path)):
      flat[i][path] = torch.bernoulli(torch.full_like(t, DENSITY, dtype=torch.float32)).numpy()
  return [traverse_util.unflatten_dict(f, sep="/") for f in flat]


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_equals_peft(combination):
  base, models = ref.trees()
  got = ref.flat(
      merging.dare(base, models, ref.WEIGHTS, DENSITY, masks=_masks(base, models, 10), combination=combination)
  )
  for k, path in enumerate(sorted(ref.SHAPES)):
    torch.manual_seed(10 + k)
    tensors, weights = ref.task_tensors(base, models, path), torch.tensor(ref.WEIGHTS)
    if combination == "linear":
      want = peft_merge.dare_linear(tensors, weights, DENSITY)
    else:
      want = peft_merge.dare_ties(tensors, weights, DENSITY)
    np.testing.assert_allclose(got[path] - ref.flat(base)[path], want.numpy(), atol=1e-5)


@pytest.mark.parametrize("combination, name", [("linear", "dare_linear"), ("ties", "dare_ties")])
def test_equals_mergekit(combination, name):
  base, models = ref.trees(seed=2)
  got = ref.flat(
      merging.dare(
          base,
          models,
          ref.WEIGHTS,
          DENSITY,
          masks=_masks(base, models, 20),
          combination=combination,
          rescale="l1",
          convention="mergekit",
          normalize=False,
          scale=0.9,
      )
  )
  for k, path in enumerate(sorted(ref.SHAPES)):
    torch.manual_seed(20 + k)
    want = ref.mergekit_method(
        name,
        ref.flat(base)[path],
        [ref.flat(m)[path] for m in models],
        weight=ref.WEIGHTS,
        density=[DENSITY] * 3,
        **{"lambda": 0.9},
    )
    np.testing.assert_allclose(got[path], want, atol=1e-5)


def test_random_masks_keep_the_density_and_rescale_by_it():
  base = {"w": np.zeros((200, 100), np.float32)}
  model = {"w": np.ones((200, 100), np.float32)}
  got = np.asarray(merging.dare(base, [model], 1.0, 0.3, key=jax.random.key(0))["w"])
  assert set(np.unique(got)) == {0.0, np.float32(1 / 0.3)}
  assert abs(np.mean(got > 0) - 0.3) < 0.02
  again = np.asarray(merging.dare(base, [model], 1.0, 0.3, key=jax.random.key(0))["w"])
  np.testing.assert_array_equal(got, again)
  with pytest.raises(ValueError, match="exactly one of key= .* or masks="):
    merging.dare(base, [model], 1.0, 0.3)


def test_scanned_layers_rescale_per_layer_with_stacked_axes():
  """mergekit's dare_linear (L1 rescale) on each layer of a stacked leaf, with the same masks."""
  rng = np.random.default_rng(3)
  base = {"layers": {"kernel": rng.normal(size=(3, 4, 5)).astype(np.float32)}}
  models = [{"layers": {"kernel": base["layers"]["kernel"] + rng.normal(size=(3, 4, 5)).astype(np.float32)}}] * 2
  models = [models[0], {"layers": {"kernel": models[1]["layers"]["kernel"] * 1.5}}]
  masks, want = [np.zeros((3, 4, 5), np.float32) for _ in models], []
  for k in range(3):
    torch.manual_seed(30 + k)
    for i in range(2):
      masks[i][k] = torch.bernoulli(torch.full((4, 5), DENSITY)).numpy()
    torch.manual_seed(30 + k)
    want.append(
        ref.mergekit_method(
            "dare_linear",
            base["layers"]["kernel"][k],
            [m["layers"]["kernel"][k] for m in models],
            weight=[1.0, 0.5],
            density=[DENSITY] * 2,
        )
    )
  got = merging.dare(
      base,
      models,
      [1.0, 0.5],
      DENSITY,
      masks=[{"layers": {"kernel": m}} for m in masks],
      rescale="l1",
      convention="mergekit",
      normalize=False,
      stacked_axes={"layers/.*": 1},
  )
  np.testing.assert_allclose(got["layers"]["kernel"], np.stack(want), atol=1e-5)
