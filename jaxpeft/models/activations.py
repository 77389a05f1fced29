"""GELU in the erf form that PyTorch and Hugging Face transformers compute.

  gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))

(Hendrycks & Gimpel, "Gaussian Error Linear Units", 2016, arXiv:1606.08415.) `jax.nn.gelu(x,
approximate=False)` computes the same function as `x erfc(-x / sqrt(2)) / 2`. The erfc form keeps relative
precision deep in the negative tail (x < -5, where gelu(x) < 1e-5), which a float32 transformer never
resolves against its other activations; the erf form is the one `torch.nn.functional.gelu` (CPU and CUDA
kernels) and transformers' `GELUActivation` evaluate, so our models' numerics follow the reference models
more closely with it. It is also cheaper where it matters: XLA:CPU evaluates `erf` as one clamped rational
polynomial and `erfc` through `exp` and a branch per range, and in the train step of BERT at
all-MiniLM-L6-v2's size (batch 16 x 128) the GELU passes fell from ~119 ms to ~75 ms of a ~2 s step (profile in the README,
"Train-step speed"; issue 20). The two forms differ by at most ~5e-7 absolute on standard-normal inputs
(tests/models/activations_test.py checks both against `torch.nn.functional.gelu`).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax


def gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU, `0.5 x (1 + erf(x / sqrt(2)))`, in `x`'s dtype."""
  x = jnp.asarray(x)
  return 0.5 * x * (1 + lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype)))
