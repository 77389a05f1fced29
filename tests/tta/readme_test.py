"""The README's test-time adaptation example runs and adapts the norm layers."""

import pathlib

import numpy as np


def test_readme_tta_example():
  readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
  section = readme.split("## Test-time adaptation (`jaxpeft.tta`)", 1)[1]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (16, 10)
  before = namespace["variables"]["params"]["stem_bn"]["scale"]
  assert not np.allclose(namespace["state"].params["stem_bn"]["scale"], before)
