r"""UnMix-TNS: normalise each test image with a mixture of K online-updated statistics components.

Tomar, Vray, Thiran, Bozorgtabar, "Un-Mixing Test-Time Normalization Statistics: Combatting Label
Temporal Correlation", ICLR 2024 (arXiv:2401.08328). Reference code: devavratTomar/unmixtns
(`tta_experiments/unmixtns.py`: `BaseNormLayer`, `UnMixTNS2d`, `replace_bn_layers`; defaults in
`tta_experiments/conf.py`).

Every BatchNorm layer (source running mean ``mu_s`` and variance ``sigma_s^2``) keeps ``K`` components
``(m_k, v_k)``, initialised as ``m_k = mu_s + sqrt(alpha K / (K - 1)) sigma_s z_k`` (``z_k ~ N(0, I)``,
``alpha = 0.5``) and ``v_k = (1 - alpha) sigma_s^2`` (``K = 1``: the source statistics). For image ``i`` of
a batch with per-image (instance) mean ``mu_i`` and biased variance ``sigma_i^2`` over the spatial axes:

.. math::  w_{ik} = \mathrm{softmax}_k\big(\cos(\mu_i, m_k) / 0.07\big), \qquad
           \bar m_{ik} = (1 - w_{ik}) m_k + w_{ik} \mu_i, \qquad \bar v_{ik} = (1 - w_{ik}) v_k + w_{ik} \sigma_i^2

.. math::  \mu^{(i)} = \frac{1}{K}\sum_k \bar m_{ik}, \qquad
           \sigma^{2(i)} = \frac{1}{K}\sum_k \bar v_{ik} + \frac{1}{K}\sum_k \bar m_{ik}^2 - (\mu^{(i)})^2

and image ``i`` is normalised with ``(mu^(i), sigma^2(i))`` (the layer's own scale and bias). Then the
components move towards the instances they explain, ``m_k += \rho \frac{1}{B}\sum_i w_{ik} (\mu_i - m_k)``,
``v_k += \rho \frac{1}{B}\sum_i w_{ik} (\sigma_i^2 - v_k)``, with ``rho = 1 - (1 - momentum)^{B / B_max}``
(`momentum` the PyTorch BatchNorm momentum, 0.1; ``B_max = 64``). Layers on (batch, channels) inputs
(BatchNorm1d) use the source statistics, as the reference's `UnMixTNS1d`. No gradient. Defaults
(`conf.py`): ``K = 16``, ``B_max = 64``. Each image's statistics depend on the batch only through the
components, so it works on non-i.i.d. streams and batches of one.

Deviations: the initial noise ``z_k`` is drawn from `jax.random` with `seed` (the reference uses
PyTorch's global generator); ``cos`` normalises with ``max(||.||, 1e-12)`` as `F.normalize`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.tta import core


@dataclasses.dataclass(frozen=True)
class Config:
  apply_fn: core.ApplyFn
  num_components: int = 16
  momentum: float = 0.1  # PyTorch BatchNorm momentum of the source model
  batch_size_max: int = 64
  init_coefficient: float = 0.5  # alpha of the component initialisation
  temperature: float = 0.07
  seed: int = 0


def init(params: core.PyTree, model_state: core.PyTree, config: Config) -> core.TTAState:
  """K components per BatchNorm layer, keyed by the layer's '/'-joined path."""
  core.check_batch_stats(model_state, "unmix_tns")
  if config.num_components < 1:
    raise ValueError(f"unmix_tns: num_components={config.num_components}; use 1 or more.")
  k = config.num_components
  coefficient = 0.0 if k == 1 else config.init_coefficient
  layers = traverse_util.flatten_dict(model_state["batch_stats"], sep="/")
  means, variances = {}, {}
  paths = sorted({key.rsplit("/", 1)[0] for key in layers})
  for i, path in enumerate(paths):
    mean, var = layers[f"{path}/mean"], layers[f"{path}/var"]
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(config.seed), i), (k,) + mean.shape, mean.dtype)
    scale = math.sqrt(coefficient * k / (k - 1)) if k > 1 else 0.0
    means[path] = mean[None] + scale * jnp.sqrt(var)[None] * noise
    variances[path] = jnp.broadcast_to((1 - coefficient) * var, (k,) + var.shape)
  extra = {"means": means, "vars": variances}
  return core.TTAState(params={}, fixed=params, model_state=model_state, opt_state=(), extra=extra, config=config)


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def step(state: core.TTAState, images: jax.Array) -> tuple[core.TTAState, jax.Array]:
  config, extra = state.config, state.extra
  rho = 1 - (1 - config.momentum) ** (images.shape[0] / config.batch_size_max)
  means, variances = dict(extra["means"]), dict(extra["vars"])

  def normalizer(path, x, source_mean, source_var):
    if x.ndim == 2:
      return source_mean, source_var
    axes = tuple(range(1, x.ndim - 1))
    inst_mean, inst_var = jnp.mean(x, axes), jnp.var(x, axes)  # (B, C)
    m, v = extra["means"][path], extra["vars"][path]  # (K, C)
    w = jax.nn.softmax(_normalize(inst_mean) @ _normalize(m).T / config.temperature, axis=-1)[..., None]
    mixed_mean = (1 - w) * m[None] + w * inst_mean[:, None]  # (B, K, C)
    mixed_var = (1 - w) * v[None] + w * inst_var[:, None]
    mean = mixed_mean.mean(1)
    var = mixed_var.mean(1) + (mixed_mean**2).mean(1) - mean**2
    means[path] = m + rho * jnp.mean(w * (inst_mean[:, None] - m[None]), 0)
    variances[path] = v + rho * jnp.mean(w * (inst_var[:, None] - v[None]), 0)
    shape = (x.shape[0],) + (1,) * len(axes) + (x.shape[-1],)
    return mean.reshape(shape), var.reshape(shape)

  logits, _ = core.forward_with_normalizer(config, state.fixed, state.model_state, images, normalizer)
  return state.replace(extra={"means": means, "vars": variances}), logits
