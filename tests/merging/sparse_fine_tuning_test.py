"""LT-SFT differences: global top-K against numpy; composition adds the differences to the base."""

import numpy as np
import pytest

from jaxpeft import merging
from tests.merging import references as ref


def test_global_top_k_and_composition():
  base, (language, task) = ref.trees(n=2)
  phi_language = merging.sparse_difference(language, base, num_kept=7)
  phi_task = merging.sparse_difference(task, base, num_kept=12)
  for phi, model, k in ((phi_language, language, 7), (phi_task, task, 12)):
    diff = {p: ref.flat(model)[p] - ref.flat(base)[p] for p in ref.SHAPES}
    threshold = np.sort(np.concatenate([np.abs(d).ravel() for d in diff.values()]))[-k]
    for p, d in diff.items():
      np.testing.assert_array_equal(ref.flat(phi)[p], np.where(np.abs(d) >= threshold, d, 0.0))
    assert sum(np.count_nonzero(v) for v in ref.flat(phi).values()) == k
  composed = ref.flat(merging.compose(base, [phi_language, phi_task]))
  for p in ref.SHAPES:
    np.testing.assert_allclose(
        composed[p], ref.flat(base)[p] + ref.flat(phi_language)[p] + ref.flat(phi_task)[p], atol=1e-6
    )
  with pytest.raises(ValueError, match="num_kept must be in"):
    merging.sparse_difference(task, base, num_kept=0)
