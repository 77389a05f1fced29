"""Helpers for harness tests that need to know a run's starting weights and its first batches."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxpeft.data import input_pipeline
from jaxpeft.models.registry import build_model


def train_loader(config) -> input_pipeline.BatchLoader:
  """The run's training batches as one process sees all of them (global batches, the run's order)."""
  data_dir = input_pipeline.resolve_data_dir(config.dataset.data_dir)
  source, _ = input_pipeline.get_data_source(config.dataset.name, config.dataset.train_split, data_dir)
  source = input_pipeline.select_classes(source, config.dataset)
  return input_pipeline.BatchLoader(
      source,
      global_batch_size=config.batch_size,
      seed=config.seed,
      preprocess=input_pipeline.get_preprocess(config.dataset.name, config.dataset),
  )


def save_initial_params(config, path: str) -> dict[str, np.ndarray]:
  """Saves a fresh init of `config.model` at `path` (for `config.init_from.params`); returns it flat."""
  example = train_loader(config).batch(0)
  inputs = [jnp.asarray(example[k][:1]) for k in config.dataset.input_keys]
  params = build_model(config.model).init(jax.random.key(42), *inputs)["params"]
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  return flat(params)


def flat(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}
