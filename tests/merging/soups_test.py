"""Model soups against a numpy transcription of the model-soups reference's greedy loop."""

import numpy as np

from jaxpeft import merging
from tests.merging import references as ref

MODELS = ref.trees(seed=9, n=6)[1]
TARGET = {p: np.mean([ref.flat(m)[p] for m in (MODELS[1], MODELS[3], MODELS[5])], 0) for p in ref.SHAPES}


def _score(tree):
  """A held-out score peaking at an average of some of the models, so the greedy choice is non-trivial."""
  return -sum(float(np.sum((np.asarray(v) - TARGET[p]) ** 2)) for p, v in ref.flat(tree).items())


def test_uniform_soup_is_the_mean():
  _, models = ref.trees()
  got = ref.flat(merging.uniform_soup(models))
  for path in ref.SHAPES:
    np.testing.assert_allclose(got[path], np.mean([ref.flat(m)[path] for m in models], 0), atol=1e-6)


def test_greedy_soup_follows_the_reference_loop():
  models = MODELS
  flat = [ref.flat(m) for m in models]
  order = np.argsort([-_score(m) for m in models], kind="stable")
  soup, best = [order[0]], _score(models[order[0]])
  for i in order[1:]:
    candidate = {p: np.mean([flat[j][p] for j in soup + [i]], 0) for p in ref.SHAPES}
    score = -sum(float(np.sum((candidate[p] - TARGET[p]) ** 2)) for p in ref.SHAPES)
    if score >= best:
      soup, best = soup + [i], score
  got, chosen = merging.greedy_soup(models, _score)
  assert chosen == [int(i) for i in soup] and 1 < len(chosen) < 6
  for path in ref.SHAPES:
    np.testing.assert_allclose(ref.flat(got)[path], np.mean([flat[j][path] for j in soup], 0), atol=1e-5)
