r"""TRAM: Trust Region Aware Minimization, SAM whose radius is a function-space trust region.

Paper: T. Sherborne, N. Saphra, P. Dasigi, H. Peng, "TRAM: Bridging Trust Regions and Sharpness
Aware Minimization", ICLR 2024, arXiv:2310.03646. Official code: tomsherborne/tram_optimizer.

TRAM is SAM (`jaxpeft.optim.sam`) with the fixed radius ``rho`` replaced, at every step, by a
trust-region distance ``rho_t`` between output distributions, computed on the current batch:

.. math::

  g = \nabla L_B(\theta_t), \quad
  \rho_t = d(\theta_t), \quad
  \epsilon_t = \rho_t \, \frac{T^2 g}{\lVert T g \rVert_2 + \epsilon_0}, \quad
  \theta_{t+1} = \theta_t + \mathrm{base}\big(\nabla L_B(\theta_t + \epsilon_t)\big)

with ``T = 1`` (or ASAM's ``|theta| + eta`` when ``adaptive=True``). The paper's variants differ
only in the distance ``d``:

  * TRAM-θ_{t-1}: ``KL(f(x; θ_{t-1}) || f(x; θ_t))``, the divergence of the model's predictive
    distribution from the previous step's (``reference_decay=0``, the default);
  * TRAM-θ_0: the same against the pre-trained model ``θ_0`` (``reference_decay=1``);
    a ``reference_decay`` in (0, 1) gives an exponential moving average of past parameters, as the
    official ``ParameterHistoryTarget`` does with its ``decay``;
  * TRAM-x: ``KL(f(x + z; θ_t) || f(x; θ_t))`` with input noise ``z`` (``reference_decay=None``:
    no reference parameters are kept).

In each case the first argument of the KL is the target (reference model or noised input) and the
second the current model on the clean batch, the official code's default ("forward") direction.
The paper's fourth variant, TRAM-Fisher (an FSAM-style Fisher-metric neighbourhood), changes the
shape of the perturbation rather than its radius and is not offered here.

Extra arguments of ``update(grads, state, params, *, grad_fn, trust_region_logits_fn)`` (or
``trust_region_fn`` instead of ``trust_region_logits_fn``):

  * ``grad_fn(params) -> grads``: the loss gradient on the current batch (as for SAM);
  * ``trust_region_logits_fn(params, reference_params, *, train) -> (target_logits, logits)``:
    the target's logits (the reference model's, or the model's on noised inputs) and the current
    model's, on the current batch; ``train`` says whether the current logits are to be computed as
    in training (dropout on, as the loss's forward pass). TRAM turns them into ``rho_t`` with the
    ``distance`` option (`kl_divergence`):

      - ``"batch_mean_kl"`` (default): ``mean_b sum_c p_t (log p_t - log p)`` with both logits
        from the evaluation-mode model (``train=False``): the paper's ``KL(target || current)``, the
        expected divergence of one example's predictive distribution, so a radius does not change
        with the batch size or the number of classes;
      - ``"official_kl"``: the official code's ``kl.py`` ``KLDivergence("forward")``,
        ``F.kl_div(reduction="mean")`` (a mean over batch x classes) divided once more by the
        batch size, i.e. ``sum KL / (batch² · classes)`` -- ``batch · classes`` times smaller --
        with the current logits from the training-mode forward pass (``train=True``; the official
        training step reuses the loss's outputs) and the target in evaluation mode (its
        ``ModelEmaV2`` copy is in ``eval()``). Use it to compare with the official numbers.

    ``reference_params`` is ``θ_{t-1}`` (or the average above) kept in the optimizer state,
    ``None`` when ``reference_decay=None``. The official code also multiplies the distance by a
    ``logit_scale`` (1 by default): scale the logits' distance yourself with ``trust_region_fn``;
  * ``trust_region_fn(params, reference_params) -> scalar``: any distance ``rho_t`` computed by
    the caller (used as is; only with the default ``distance``).

The reference starts at the initial parameters, so the first step has ``rho_0 = 0`` (a plain base
optimizer step), as in the official code, whose parameter history is initialised as a copy of the
model (with ``"official_kl"`` and dropout, its train-mode logits make ``rho_0`` small but not 0). After each step ``ref <- decay * ref + (1 - decay) * θ_t`` (``optax.incremental_update``),
so the next step compares ``θ_{t+1}`` with ``θ_t``.

Deviation from the official code (a bug there, fixed here by following the paper): its
``TRAM.first_step`` builds the perturbation as ``e_w = scale`` (``adaptive=False``: ``ones_like``)
or ``e_w = scale * θ²`` (``adaptive=True``) with ``scale = rho_t / (||T g|| + 1e-12)``: it never
multiplies by the gradient. Every coordinate is shifted by the same constant (or by ``θ²``), not
along the ascent direction ``g / ||g||`` of the paper's SAM step, so the adversarial point is not
the first-order worst case in the trust region. Here ``e = rho_t * T² g / (||T g|| + eps)``
(``perturbation="paper"``, the default); ``perturbation="official_code"`` reproduces the official
step, ``e = rho_t * (1 or θ²) / (||T g|| + eps)`` with ``T = |θ|`` (no ``eta``), to compare with
its numbers.

Defaults: ``eps=1e-12`` (official code), ``adaptive=False``, ``eta=0`` (the official code's
adaptive mode, like davda54/sam, has no eta). The base optimizer defaults to SGD with
``learning_rate`` (the official code requires one; the paper fine-tunes with Adam(W): pass e.g.
``base_optimizer=optax.adamw(2e-5)``). There is no package; the test suite checks this
transformation against a plain-numpy transcription of our reading of the paper (the SAM step with
radius ``rho_t``), and ``distance="official_kl"`` with ``perturbation="official_code"`` against a
torch transcription of the official ``TRAM.first_step`` / ``second_step`` and ``kl.py``.

Multiple devices: with ``axis_name`` (the data-parallel batch axis) the incoming gradient,
``grad_fn``'s gradient and the distance are averaged with ``jax.lax.pmean``, so every device uses
the full-batch radius and perturbation and the result equals the single-device result on the whole
batch (for batch-mean losses and distances over equal-sized shards). The official code's README
notes it ignores m-sharpness under multi-GPU training; ``axis_name=None`` with per-device
gradients gives per-device perturbations instead.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpeft.optim.sam import GradFn, base_optimizer_or_sgd, check_opaque_args, sharpness_aware_gradient

TrustRegionFn = Callable[[optax.Params, optax.Params | None], jax.typing.ArrayLike]
TrustRegionLogitsFn = Callable[..., tuple[jax.Array, jax.Array]]
DISTANCES = ("batch_mean_kl", "official_kl")
PERTURBATIONS = ("paper", "official_code")


def kl_divergence(target_logits: jax.Array, logits: jax.Array, *, official: bool = False) -> jax.Array:
  """``KL(softmax(target_logits) || softmax(logits))`` over the last axis (classes), as a scalar.

  ``official=False``: summed over classes, averaged over the other axes (the batch). ``official=True``:
  the official code's ``F.kl_div(log_softmax(logits), log_softmax(target_logits), log_target=True,
  reduction="mean") / batch`` (``batch = shape[0]``), i.e. ``batch · classes`` times smaller. In float32.
  """
  log_target = jax.nn.log_softmax(target_logits.astype(jnp.float32))
  log_current = jax.nn.log_softmax(logits.astype(jnp.float32))
  terms = jnp.exp(log_target) * (log_target - log_current)
  return jnp.mean(terms) / terms.shape[0] if official else jnp.mean(jnp.sum(terms, axis=-1))


def _official_code_perturbation(
    grads: optax.Updates, params: optax.Params, radius: jax.Array, adaptive: bool, eps: jax.typing.ArrayLike
) -> optax.Updates:
  """The official ``TRAM.first_step``: ``rho_t / (||T g|| + eps)`` times ones (or ``θ²``), ``T = |θ|`` or 1."""

  def scaled(p: jax.Array, g: jax.Array) -> jax.Array:
    return (jnp.abs(p) * g if adaptive else g).astype(jnp.promote_types(g.dtype, jnp.float32))

  factor = radius / (optax.tree.norm(jax.tree.map(scaled, params, grads)) + eps)
  return jax.tree.map(
      lambda p: (factor * (jnp.square(p) if adaptive else jnp.ones_like(p))).astype(p.dtype), params
  )


class TramState(NamedTuple):
  """State of `scale_by_tram`: the reference parameters of the trust region (None for TRAM-x)."""

  reference_params: optax.Params | None


def scale_by_tram(
    *,
    reference_decay: jax.typing.ArrayLike | None = 0.0,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: str | None = None,
    distance: str = "batch_mean_kl",
    perturbation: str = "paper",
) -> optax.GradientTransformationExtraArgs:
  """Replaces the gradient by TRAM's gradient ``grad_fn(θ + e)`` with the trust-region radius.

  Args:
    reference_decay: decay of the reference parameters handed to ``trust_region_fn``: 0 keeps
      the previous step's parameters (TRAM-θ_{t-1}), 1 the initial ones (TRAM-θ_0), values in
      between an exponential moving average; None keeps none (TRAM-x).
    adaptive: ASAM's scale-invariant neighbourhood ``T = |θ| + eta``.
    eta: ASAM's offset (only used if ``adaptive``).
    eps: added to the gradient norm.
    axis_name: data-parallel axis over which gradients and the distance are averaged (with
      ``"official_kl"`` each device divides by its own batch, as the official code per GPU).
    distance: ``"batch_mean_kl"`` (the paper's KL, default) or ``"official_kl"`` (the official
      code's normalisation and train-mode logits); module docstring.
    perturbation: ``"paper"`` (default, the SAM step along ``T² g``) or ``"official_code"`` (the
      official code's constant shift; module docstring).

  Returns:
    A transformation whose ``update(grads, state, params, *, grad_fn, trust_region_logits_fn)``
    (or ``trust_region_fn=``) returns TRAM gradients.
  """
  if distance not in DISTANCES:
    raise ValueError(f"scale_by_tram: distance={distance!r}; use one of {DISTANCES}.")
  if perturbation not in PERTURBATIONS:
    raise ValueError(f"scale_by_tram: perturbation={perturbation!r}; use one of {PERTURBATIONS}.")

  def init_fn(params: optax.Params) -> TramState:
    if reference_decay is None:
      return TramState(reference_params=None)
    return TramState(reference_params=jax.tree.map(jnp.copy, params))

  def update_fn(
      updates: optax.Updates,
      state: TramState,
      params: optax.Params | None = None,
      *,
      grad_fn: GradFn | None = None,
      trust_region_fn: TrustRegionFn | None = None,
      trust_region_logits_fn: TrustRegionLogitsFn | None = None,
      **extra_args,
  ) -> tuple[optax.Updates, TramState]:
    del extra_args
    check_opaque_args("scale_by_tram", params, grad_fn)
    if trust_region_logits_fn is not None:
      official = distance == "official_kl"
      target_logits, logits = trust_region_logits_fn(params, state.reference_params, train=official)
      radius = kl_divergence(target_logits, logits, official=official)
    elif trust_region_fn is not None and distance == "batch_mean_kl":
      radius = jnp.asarray(trust_region_fn(params, state.reference_params))
    else:
      raise ValueError(
          "scale_by_tram: `update` needs `trust_region_logits_fn=`, a function (params, "
          "reference_params, *, train) -> (target_logits, logits) on the current batch"
          + (
              " (distance='official_kl' computes the distance itself, so `trust_region_fn` is not used)."
              if trust_region_fn is not None
              else ", or `trust_region_fn=`, a function (params, reference_params) -> scalar distance."
          )
      )
    if radius.ndim != 0:
      raise ValueError(
          f"scale_by_tram: `trust_region_fn` must return a scalar, got shape {radius.shape}; "
          "average the per-example divergences over the batch."
      )
    if axis_name is not None:
      radius = jax.lax.pmean(radius, axis_name)
    if perturbation == "paper":
      tram_grads = sharpness_aware_gradient(
          updates, params, grad_fn, radius, adaptive=adaptive, eta=eta, eps=eps, axis_name=axis_name
      )
    else:
      mean_over_devices = (
          (lambda tree: tree) if axis_name is None else (lambda tree: jax.lax.pmean(tree, axis_name))
      )
      shift = _official_code_perturbation(mean_over_devices(updates), params, radius, adaptive, eps)
      tram_grads = mean_over_devices(grad_fn(optax.apply_updates(params, shift)))
    if reference_decay is None:
      return tram_grads, state
    reference = optax.incremental_update(params, state.reference_params, 1.0 - reference_decay)
    return tram_grads, TramState(reference_params=reference)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tram(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference_decay: jax.typing.ArrayLike | None = 0.0,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-12,
    base_optimizer: optax.GradientTransformation | None = None,
    axis_name: str | None = None,
    distance: str = "batch_mean_kl",
    perturbation: str = "paper",
) -> optax.GradientTransformationExtraArgs:
  """TRAM in opaque mode: ``chain(scale_by_tram(...), base_optimizer)``.

  Example (TRAM-θ_{t-1} with AdamW)::

    tx = tram(base_optimizer=optax.adamw(2e-5))
    def logits(params, reference, *, train):
      return apply(reference, batch, train=False), apply(params, batch, train=train)
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch),
                               trust_region_logits_fn=logits)

  Args:
    learning_rate: learning rate (float or schedule) of the default SGD base optimizer; None when
      ``base_optimizer`` is given.
    reference_decay: see `scale_by_tram` (0: previous step, 1: initial params, None: TRAM-x).
    adaptive: ASAM's scale-invariant neighbourhood.
    eta: ASAM's offset.
    eps: added to the gradient norm.
    base_optimizer: optimizer applied to the TRAM gradient (default ``optax.sgd(learning_rate)``).
    axis_name: data-parallel axis name for ``pmap`` / ``shard_map``.
    distance: ``"batch_mean_kl"`` (default) or ``"official_kl"``; see `scale_by_tram`.
    perturbation: ``"paper"`` (default) or ``"official_code"``; see `scale_by_tram`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``, ``grad_fn=``
    and ``trust_region_logits_fn=`` (or ``trust_region_fn=``).
  """
  base = base_optimizer_or_sgd("tram", learning_rate, base_optimizer)
  core = scale_by_tram(
      reference_decay=reference_decay,
      adaptive=adaptive,
      eta=eta,
      eps=eps,
      axis_name=axis_name,
      distance=distance,
      perturbation=perturbation,
  )
  return optax.chain(core, base)
