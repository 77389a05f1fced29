"""The code block under the README's "Merging" heading runs and gives the closed-form results."""

import pathlib

import jax
import numpy as np


def _readme_example() -> str:
  readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
  section = readme.split("## Merging (`jaxpeft.merging`)", 1)[1]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example():
  namespace = {}
  exec(compile(_readme_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  base, finetuned = namespace["base"], namespace["finetuned"]
  for path in (("dense", "kernel"), ("dense", "bias")):
    leaf = lambda t: np.asarray(t[path[0]][path[1]])
    np.testing.assert_allclose(
        leaf(namespace["arithmetic"]), leaf(base) + 0.4 * sum(leaf(m) - leaf(base) for m in finetuned), atol=1e-6
    )
    np.testing.assert_allclose(leaf(namespace["soup"]), np.mean([leaf(m) for m in finetuned], 0), atol=1e-6)
  assert np.count_nonzero(jax.tree_util.tree_leaves(namespace["ties"])[1]) <= 3 * int(0.2 * 12)
