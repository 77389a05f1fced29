"""benchmarks/tta.py: the PyTorch ResNet is jaxpeft's (same parameter shapes), and a tiny run reports ratios."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import tta
from jaxpeft.models.resnet import ResNet


def _torch_shape(shape):
  """A PyTorch parameter's shape in Flax's layout (conv OIHW -> HWIO, linear (out, in) -> (in, out))."""
  return tuple(shape[2:]) + (shape[1], shape[0]) if len(shape) == 4 else tuple(reversed(shape))


def test_torch_resnet_has_the_flax_resnets_parameters():
  stage_sizes, width = (2, 1), 4
  params = ResNet(tta.NUM_CLASSES, stage_sizes=stage_sizes, width=width).init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1))
  )
  flax_shapes = sorted(x.shape for x in jax.tree.leaves(params["params"]))
  torch_shapes = sorted(_torch_shape(p.shape) for p in tta.torch_resnet(stage_sizes, width).parameters())
  assert torch_shapes == flax_shapes


def test_tiny_benchmark_reports_images_per_second_and_ratios():
  report = tta.benchmark(["tent", "eata"], batch_size=4, rounds=2, stage_sizes=(1,), width=4, torch_threads=1)
  rows = {
      line.split("|")[1].strip(): line.split("|")[2:-1] for line in report.splitlines() if line.startswith("| ")
  }
  assert set(rows) >= {"jaxpeft tent", "jaxpeft eata", "PyTorch tent", "PyTorch eata"}
  for name in ("jaxpeft tent", "jaxpeft eata"):
    assert float(rows[name][0]) > 0 and np.isfinite(float(rows[name][2]))
  assert "uptime before:" in report
