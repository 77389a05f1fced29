r"""CAFA: class-aware feature alignment to the source class statistics (Mahalanobis distances).

Jung, Lee, Kim, Kim, Kim, Kim, Choo, "CAFA: Class-Aware Feature Alignment for Test-Time Adaptation",
ICCV 2023 (arXiv:2206.00205). We found no public code from the authors: this transcribes the paper's
equations (Eqns. 1-5), checked against a third-party implementation (`class_aware_feature_alignment_loss`
and `get_prior_classed_statistics`, a fault-diagnosis repository found by search).

Source statistics (`prepare`, from labelled clean images of the training split, the source model with
its BatchNorm running averages): for every class ``c`` the mean ``mu_c`` and the (biased) covariance
``Sigma_c`` of the penultimate features ``g(x)``. With the Mahalanobis distance

.. math::  D(x; \mu, \Sigma) = (g(x) - \mu)^\top (\Sigma + \epsilon I)^{-1} (g(x) - \mu),

the loss on a test batch (BatchNorm with batch statistics; ``hat y_i`` the model's prediction) is

.. math::  L(\theta) = \frac{1}{B} \sum_i \log \frac{D(x_i; \mu_{\hat y_i}, \Sigma_{\hat y_i})}
           {\sum_{c} D(x_i; \mu_c, \Sigma_c)}

pulling each feature towards its predicted class (intra-class) and away from the others (inter-class);
``theta`` is the norm affine parameters (`pattern`), the optimizer any optax transformation, logits
returned are those before the update. Defaults: ``epsilon = 1e-5`` (the third-party code's), and
Tent's Adam(lr=1e-3), one step per batch (the paper builds on Tent's setting; its exact learning rates
per dataset were not checked). The model must sow its features (`core.forward_with_features`).

Deviations: the precisions ``(Sigma_c + epsilon I)^{-1}`` are computed once in `prepare`; the
third-party code inverts every time and adds ``epsilon I`` to the stored covariance in place at every
call (so its regulariser grows), which is not in the paper and not reproduced. Every class needs at
least two clean images.
"""

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  num_classes: int
  optimizer: optax.GradientTransformation = optax.adam(1e-3)
  pattern: str = core.NORM_AFFINE
  epsilon: float = 1e-5
  steps: int = 1


def prepare(
    params: core.PyTree,
    model_state: core.PyTree,
    config: Config,
    clean_batches: Iterable[tuple[jax.Array, np.ndarray]],
) -> dict[str, jax.Array]:
  """`init`'s keyword arguments: per-class feature means and precisions of labelled clean images."""
  feats, labels = core.clean_features(
      params, model_state, config, list(clean_batches), "cafa (its class statistics)"
  )
  counts = np.bincount(labels, minlength=config.num_classes)
  if counts.min() < 2:
    raise ValueError(
        f"cafa needs at least 2 clean images of every class for its class statistics; got counts "
        f"{counts.tolist()}. Use more clean images (config.clean_images)."
    )
  means, precisions = [], []
  for c in range(config.num_classes):
    centred = feats[labels == c] - feats[labels == c].mean(0)
    covariance = centred.T @ centred / len(centred)
    means.append(feats[labels == c].mean(0))
    precisions.append(np.linalg.inv(covariance + config.epsilon * np.eye(feats.shape[1])))
  return {
      "class_means": jnp.asarray(np.stack(means), jnp.float32),
      "class_precisions": jnp.asarray(np.stack(precisions), jnp.float32),
  }


def init(
    params: core.PyTree,
    model_state: core.PyTree,
    config: Config,
    class_means: jax.Array | None = None,
    class_precisions: jax.Array | None = None,
) -> core.TTAState:
  if class_means is None or class_precisions is None:
    raise ValueError("cafa.init needs class_means and class_precisions (from cafa.prepare).")
  state = core.make_state(params, model_state, config, "cafa")
  return state.replace(extra={"class_means": class_means, "class_precisions": class_precisions})


def alignment_loss(
    features: jax.Array, predicted: jax.Array, means: jax.Array, precisions: jax.Array
) -> jax.Array:
  """The batch mean of ``log(D(x; mu_yhat) / sum_c D(x; mu_c))`` (module docstring)."""
  diff = features[:, None, :] - means[None]  # (B, C, D)
  distance = jnp.einsum("bcd,cde,bce->bc", diff, precisions, diff)
  intra = jnp.take_along_axis(distance, predicted[:, None], 1)[:, 0]
  return jnp.mean(jnp.log(intra / distance.sum(1)))


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config, extra = state.config, state.extra

  def loss_fn(params):
    logits, features = core.forward_with_features(
        config, core.join(params, state.fixed), state.model_state, images, batch_stats=True
    )
    predicted = jax.lax.stop_gradient(jnp.argmax(logits, -1))
    return alignment_loss(features, predicted, extra["class_means"], extra["class_precisions"]), logits

  logits = None
  for _ in range(config.steps):
    state, logits = core.descend(state, loss_fn)
  return state, logits
