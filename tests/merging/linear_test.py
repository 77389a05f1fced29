"""Linear merging against mergekit's ``linear``."""

import numpy as np
import pytest

from jaxpeft import merging
from tests.merging import references as ref


@pytest.mark.parametrize("normalize", [True, False])
def test_equals_mergekit(normalize):
  _, models = ref.trees()
  got = ref.flat(merging.linear(models, ref.WEIGHTS, normalize=normalize))
  for path in ref.SHAPES:
    want = ref.mergekit_linear([ref.flat(m)[path] for m in models], ref.WEIGHTS, normalize)
    np.testing.assert_allclose(got[path], want, atol=1e-5)


def test_weights_summing_to_zero_cannot_be_normalised():
  _, models = ref.trees(n=2)
  with pytest.raises(ValueError, match="sum to 0"):
    merging.linear(models, [1.0, -1.0])
