r"""UPGD: utility-based perturbed gradient descent, protecting useful weights in continual learning.

Paper: "Addressing Loss of Plasticity and Catastrophic Forgetting in Continual Learning", Mohamed
Elsayed, A. Rupam Mahmood, ICLR 2024, arXiv:2404.00781 (earlier title: "Utility-based Perturbed
Gradient Descent: An Optimizer for Continual Learning", arXiv:2302.03281).

Reference implementation followed: the ``UPGD`` class in the README of the authors' repository
(GitHub mohmdelsayed/upgd; not on PyPI) -- the first-order, global-max variant whose utility
gates both the gradient and the noise -- with its defaults ``lr=1e-5, weight_decay=1e-3,
beta_utility=0.999, sigma=1e-3``. With :math:`t` counted from 1 and :math:`\xi_t \sim N(0, I)`:

.. math::

  u_t &= \beta u_{t-1} + (1-\beta)(-g_t \odot \theta_{t-1})
      \qquad \text{(first-order utility of each weight)} \\
  \bar s_t &= \operatorname{sigmoid}\Bigl(\frac{u_t / (1-\beta^t)}{\max_{\text{all leaves}} u_t}\Bigr) \\
  \theta_t &= (1 - \alpha\lambda)\theta_{t-1} - 2\alpha\,(g_t + \sigma \xi_t)(1 - \bar s_t).

The maximum runs over every entry of every leaf, of the utility *before* bias correction (as in
the code). Weights of high utility (:math:`\bar s \to 1`) are protected from both the gradient
and the perturbation; the factor 2 makes the step :math:`\alpha(g + \sigma\xi)` where
:math:`\bar s = 1/2` (zero utility). Deviation: a zero utility when the maximum is also 0 (e.g.
zero-initialised biases while every other utility is negative) gives 0/0, NaN parameters in the
authors' code; here its ratio is 0 (:math:`\bar s = 1/2`). A negative maximum is kept as in the code.

The noise comes from a JAX PRNG key held in the state (``seed``), so it differs from torch's draws;
the test checks the rest of the update with ``sigma=0`` against a transcription of the authors'
class, and the noise's scale separately. The repository's other variants (local normalisation,
anti-correlated noise, second-order utility via HesScale, noise-only protection) are not offered.
pytorch_optimizer and optax have no UPGD.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from jaxpeft.optim._hyperparameter_checks import DECAY_RATE, NON_NEGATIVE, check_hyperparameters


class UpgdState(NamedTuple):
  """State of :func:`scale_by_upgd`."""

  count: jax.Array  # int32 number of updates so far
  utility: optax.Updates  # EMA u_t of the first-order utilities -g * theta
  key: jax.Array  # uint32 PRNG key of the perturbations


def scale_by_upgd(
    beta_utility: jax.typing.ArrayLike = 0.999,
    sigma: jax.typing.ArrayLike = 1e-3,
    seed: int = 0,
) -> optax.GradientTransformation:
  """Returns 2 (g_t + sigma xi_t)(1 - s_t): the utility-gated, perturbed gradient (before -lr).

  Args:
    beta_utility: decay of the utility EMA u_t.
    sigma: standard deviation of the Gaussian perturbation.
    seed: seed of the perturbations' PRNG key.

  Returns:
    An ``optax.GradientTransformation`` whose update needs ``params``; its state is
    :class:`UpgdState`.
  """
  check_hyperparameters("UPGD", DECAY_RATE, "Default: beta_utility=0.999.", beta_utility=beta_utility)
  check_hyperparameters("UPGD", NON_NEGATIVE, sigma=sigma)

  def init_fn(params: optax.Params) -> UpgdState:
    return UpgdState(
        count=jnp.zeros([], jnp.int32), utility=optax.tree.zeros_like(params), key=jax.random.PRNGKey(seed)
    )

  def update_fn(
      updates: optax.Updates, state: UpgdState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, UpgdState]:
    if params is None:
      raise ValueError("UPGD needs the parameters (utility = -grad * param): call update(grads, state, params).")
    count = numerics.safe_increment(state.count)
    utility = jax.tree.map(
        lambda u, g, p: beta_utility * u + (1.0 - beta_utility) * (-g * p), state.utility, updates, params
    )
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 under x64, else float32
    global_max = jnp.max(jnp.stack([jnp.max(u).astype(wide) for u in jax.tree.leaves(utility)]))
    bias_correction = 1.0 - beta_utility ** count.astype(global_max.dtype)
    leaves, treedef = jax.tree.flatten(updates)
    key, *leaf_keys = jax.random.split(state.key, len(leaves) + 1)
    noise = treedef.unflatten([jax.random.normal(k, g.shape, g.dtype) for k, g in zip(leaf_keys, leaves)])

    def gated(g, xi, u):
      # 0/0 (a zero utility when the maximum is 0) is NaN in the authors' code; here it is 0.
      ratio = jnp.where(u == 0, 0.0, u / bias_correction / jnp.where(u == 0, 1.0, global_max))
      scaled = jax.nn.sigmoid(ratio)
      return 2.0 * (g + sigma * xi) * (1.0 - scaled)

    new_updates = jax.tree.map(gated, updates, noise, utility)
    new_state = UpgdState(count=count, utility=optax.tree.cast_like(utility, state.utility), key=key)
    return optax.tree.cast_like(new_updates, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def upgd(
    learning_rate: optax.ScalarOrSchedule = 1e-5,
    beta_utility: jax.typing.ArrayLike = 0.999,
    sigma: jax.typing.ArrayLike = 1e-3,
    weight_decay: jax.typing.ArrayLike = 1e-3,
    seed: int = 0,
) -> optax.GradientTransformation:
  """UPGD with the authors' defaults and decoupled weight decay (lr * weight_decay * theta).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    beta_utility, sigma, seed: see :func:`scale_by_upgd`.
    weight_decay: decoupled decay coefficient; the parameters shrink by lr * weight_decay.

  Returns:
    An ``optax.GradientTransformation`` whose update needs ``params``.
  """
  check_hyperparameters("UPGD", NON_NEGATIVE, learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      scale_by_upgd(beta_utility, sigma, seed),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
