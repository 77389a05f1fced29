r"""Riemannian preconditioned LoRA: scaled gradients on the two LoRA factors, before any optimizer.

Paper: "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models", Fangzhao Zhang, Mert
Pilanci, ICML 2024, arXiv:2402.02347 (authors' code: GitHub pilancilab/Riemannian_Preconditioned_LoRA).

Reference implementation followed: Hugging Face PEFT's ``peft.optimizers.create_riemannian_optimizer``
(0.21), which preconditions the gradients of every trainable ``(lora_A, lora_B)`` weight pair with
``r x r`` damped inverses before the wrapped optimizer's step. In the Flax layout (``a: (d_in, r)``,
``b: (r, d_out)``, ``W' = W + s a b``):

.. math::

  \tilde g_A = g_A (B B^\top + \rho I_r)^{+}, \qquad \tilde g_B = (A^\top A + \rho I_r)^{+} g_B,

both computed from the current factors (in at least float32), with damping :math:`\rho` = ``reg``
(PEFT's default 1e-2). Scaled GD on the factors is this rule over SGD, the paper's scaled AdamW
this rule over AdamW. Like PEFT, pairs of embedding tables are left as they are (PEFT only
preconditions ``lora_A``/``lora_B`` weights), and other leaves pass through.
"""

import jax
import jax.numpy as jnp
import optax

from jaxpeft.optim import _lora_factors
from jaxpeft.optim._hyperparameter_checks import NON_NEGATIVE, check_hyperparameters
from jaxpeft.optim.lora_fa import damped_pinv

BaseOptimizer = _lora_factors.BaseOptimizer


def precondition_lora_gradients(reg: jax.typing.ArrayLike = 1e-2) -> optax.GradientTransformation:
  """Replaces each (non-embedding) pair's gradients by the Riemannian-preconditioned ones.

  Args:
    reg: damping added to the r x r matrices before the pseudo-inverse.

  Returns:
    A stateless ``optax.GradientTransformation`` that needs ``params``.
  """
  check_hyperparameters("Riemannian LoRA", NON_NEGATIVE, reg=reg)

  def precondition(g_a, g_b, a, b, is_embedding):
    if is_embedding:
      return g_a, g_b
    precond_a = damped_pinv(jnp.einsum("...rj,...sj->...rs", b, b), reg)
    precond_b = damped_pinv(jnp.einsum("...ir,...is->...rs", a, a), reg)
    new_a = jnp.einsum("...ir,...rs->...is", g_a.astype(precond_a.dtype), precond_a)
    new_b = jnp.einsum("...rs,...sj->...rj", precond_b, g_b.astype(precond_b.dtype))
    return new_a.astype(g_a.dtype), new_b.astype(g_b.dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("Riemannian LoRA needs the parameters: call update(grads, state, params).")
    return _lora_factors.map_pairs(precondition, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def riemannian_lora(
    learning_rate: optax.ScalarOrSchedule,
    reg: jax.typing.ArrayLike = 1e-2,
    weight_decay: jax.typing.ArrayLike | None = None,
    *,
    base_optimizer: BaseOptimizer = optax.adamw,
) -> optax.GradientTransformation:
  """``chain(precondition_lora_gradients(reg), base_optimizer(learning_rate[, weight_decay]))``.

  Args:
    learning_rate: the base optimizer's learning rate, float or schedule.
    reg: see :func:`precondition_lora_gradients`.
    weight_decay: passed to the base optimizer as ``weight_decay=`` unless None (its default).
    base_optimizer: a factory ``learning_rate -> GradientTransformation`` (``optax.sgd``: scaled
      GD; ``optax.adamw``: scaled AdamW). Under ``optax.inject_hyperparams`` name it in
      ``static_args``.

  Returns:
    An ``optax.GradientTransformation`` whose update needs ``params``.
  """
  base = _lora_factors.build_base("Riemannian LoRA", base_optimizer, learning_rate, weight_decay)
  return optax.chain(precondition_lora_gradients(reg), base)
