"""aTLAS recovers a planted per-task, per-block combination of task vectors on a synthetic regression."""

import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import merging
from tests.merging import references as ref


def _predict(params, x):
  return jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"]) @ params["out"]["kernel"]


def test_recovers_planted_coefficients():
  base, models = ref.trees(seed=5, n=2)
  task_vectors = [merging.task_vector(m, base) for m in models]
  planted = jnp.asarray([[0.8, -0.3, 0.5], [0.2, 0.6, -0.4]])  # (tasks, blocks) in leaf order
  target = merging.atlas_merge(base, task_vectors, planted)
  x = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)
  batches = [(x, _predict(target, x))] * 400
  loss = lambda params, batch: jnp.mean((_predict(params, batch[0]) - batch[1]) ** 2)
  learned = merging.fit_atlas(base, task_vectors, loss, batches, optax.adam(0.03))
  np.testing.assert_allclose(learned, planted, atol=2e-2)
  assert float(loss(merging.atlas_merge(base, task_vectors, learned), batches[0])) < 1e-4
