"""Task arithmetic against PEFT's ``task_arithmetic`` / ``magnitude_prune`` and mergekit's ``task_arithmetic``."""

import numpy as np
import peft.utils.merge_utils as peft_merge
import pytest
import torch

from jaxpeft import merging
from tests.merging import references as ref


@pytest.mark.parametrize("density", [1.0, 0.4])
def test_equals_peft(density):
  base, models = ref.trees()
  got = ref.flat(merging.task_arithmetic(base, models, ref.WEIGHTS, density=density))
  for path in ref.SHAPES:
    tensors, weights = ref.task_tensors(base, models, path), torch.tensor(ref.WEIGHTS)
    if density == 1.0:
      want = peft_merge.task_arithmetic(tensors, weights)
    else:
      want = peft_merge.magnitude_prune(tensors, weights, density)
    np.testing.assert_allclose(got[path] - ref.flat(base)[path], want.numpy(), atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_equals_mergekit(normalize):
  base, models = ref.trees(seed=4)
  got = ref.flat(merging.task_arithmetic(base, models, ref.WEIGHTS, scale=0.7, normalize=normalize))
  for path in ref.SHAPES:
    want = ref.mergekit_method(
        "task_arithmetic",
        ref.flat(base)[path],
        [ref.flat(m)[path] for m in models],
        weight=ref.WEIGHTS,
        normalize=normalize,
        **{"lambda": 0.7},
    )
    np.testing.assert_allclose(got[path], want, atol=1e-5)
