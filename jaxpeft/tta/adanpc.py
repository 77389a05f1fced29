r"""AdaNPC: a non-parametric (kNN) classifier over a memory of source features, grown with test features.

Zhang, Wang, Jin, Tan, "AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", ICML 2023
(arXiv:2304.12566). Reference code: yfzhang114/AdaNPC (`AdaNPC` in `domainbed/adapt_algorithms.py`,
`MomentumQueue` in `domainbed/knn.py`, hyperparameters in `unsupervised_adaptation.py`).

The memory holds L2-normalised features ``m_j`` of labelled source images with their labels ``y_j``
(`prepare`: the source model's penultimate features, BatchNorm with its source statistics). For a
test feature ``z`` (same model, never changed), with cosine similarities ``s_j = z m_j / ||z||``:

.. math::  w = \mathrm{softmax}(s_{\mathrm{top}\text{-}k} / \tau), \qquad
           p_c = \min\Big(1, \sum_{j \in \mathrm{top}\text{-}k} w_j [y_j = c] + 10^{-5}\Big)

and the image is added to the memory (feature ``z / ||z||``, label ``argmax_c p_c``) when
``max_c \mathrm{softmax}(p)_c \ge \beta`` (the reference applies a softmax to the scores ``p``, so with
``beta = 0.1`` and 10 classes every image is added). Returned logits are ``log p``; predictions are made
before the batch is added. Defaults (the reference's `adapt_hparams`): ``k = 100``, ``tau = 0.1``,
``beta = 0.1``. The model must sow its features (`core.forward_with_features`).

Deviations: (1) the memory has a fixed capacity (`memory_size` test entries after the source ones,
oldest test entries overwritten once full) so the step is jittable; the reference grows it without
bound. (2) The reference's memory starts with one random vector labelled 0 (a `MomentumQueue` of size
1) before the source features; ours holds the source features only. (3) Neighbours are searched among
the filled entries only, so ``k`` is at most the number of entries (the reference would fail on a
memory smaller than ``k``). (4) The source memory is built from `config.clean_images` images of the
training split, the reference from all of the source domains' data.
"""

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  num_classes: int
  k: int = 100
  temperature: float = 0.1
  beta: float = 0.1
  memory_size: int = 10000  # test entries kept (the reference keeps all)


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prepare(
    params: core.PyTree,
    model_state: core.PyTree,
    config: Config,
    clean_batches: Iterable[tuple[jax.Array, np.ndarray]],
) -> dict[str, jax.Array]:
  """`init`'s keyword arguments: the source model's features of labelled clean images and their labels."""
  features, labels = core.clean_features(
      params, model_state, config, list(clean_batches), "adanpc (its kNN memory)"
  )
  return {"source_features": jnp.asarray(features, jnp.float32), "source_labels": jnp.asarray(labels, jnp.int32)}


def init(
    params: core.PyTree,
    model_state: core.PyTree,
    config: Config,
    source_features: jax.Array | None = None,
    source_labels: jax.Array | None = None,
) -> core.TTAState:
  """The memory: `source_features` (N, D) with `source_labels` (N,), then `memory_size` empty slots."""
  if source_features is None or source_labels is None:
    raise ValueError("adanpc.init needs source_features and source_labels (from adanpc.prepare).")
  n, dim = source_features.shape
  extra = {
      "memory": jnp.concatenate([_normalize(source_features), jnp.zeros((config.memory_size, dim))]),
      "labels": jnp.concatenate([source_labels.astype(jnp.int32), jnp.zeros((config.memory_size,), jnp.int32)]),
      "filled": jnp.arange(n + config.memory_size) < n,
      "num_source": jnp.array(n),
      "num_added": jnp.array(0),
  }
  return core.TTAState(params={}, fixed=params, model_state=model_state, opt_state=(), extra=extra, config=config)


def scores(features: jax.Array, extra: dict[str, jax.Array], config: Config) -> jax.Array:
  """The kNN class scores ``p`` of the module docstring for each row of `features`."""
  similarity = jnp.where(extra["filled"], _normalize(features) @ extra["memory"].T, -jnp.inf)
  top, index = jax.lax.top_k(similarity, min(config.k, similarity.shape[1]))
  weights = jax.nn.softmax(top / config.temperature, axis=-1)
  one_hot = jax.nn.one_hot(extra["labels"][index], config.num_classes)
  return jnp.minimum(jnp.einsum("bk,bkc->bc", weights, one_hot) + 1e-5, 1.0)


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config, extra = state.config, state.extra
  _, features = core.forward_with_features(config, state.fixed, state.model_state, images, batch_stats=False)
  p = scores(features, extra, config)
  confident = jnp.max(jax.nn.softmax(p, axis=-1), axis=-1) >= config.beta
  # Confident images go to the next test slots (a ring over the `memory_size` test slots); others nowhere.
  slot = extra["num_added"] + jnp.cumsum(confident) - 1
  target = jnp.where(confident, extra["num_source"] + slot % config.memory_size, extra["memory"].shape[0])
  new_extra = dict(
      extra,
      memory=extra["memory"].at[target].set(_normalize(features), mode="drop"),
      labels=extra["labels"].at[target].set(jnp.argmax(p, -1).astype(jnp.int32), mode="drop"),
      filled=extra["filled"].at[target].set(True, mode="drop"),
      num_added=extra["num_added"] + jnp.sum(confident),
  )
  return state.replace(extra=new_extra), jnp.log(p)
