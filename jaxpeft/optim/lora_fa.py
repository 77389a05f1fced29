r"""LoRA-FA: LoRA with the A factors frozen and B's gradient projected onto the full-weight gradient.

Paper: "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning",
Longteng Zhang, Lin Zhang, Shaohuai Shi, Xiaowen Chu, Bo Li, 2023, arXiv:2308.03303; the projected
gradient is from "LoRA-FA optimizer" as implemented in Hugging Face PEFT.

Reference implementation followed: PEFT's ``peft.optimizers.LoraFAOptimizer`` /
``create_lorafa_optimizer`` (0.21). On a LoRA pair (Flax layout ``a: (d_in, r)``, ``b: (r, d_out)``,
scale :math:`s` = ``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA), A never changes and B's
gradient is replaced by

.. math::

  \tilde g_B = \frac{1}{s^2} (A^\top A + \delta I_r)^{+} g_B

(PEFT: ``grad_B @ pinv(A A^T + delta I) / s^2`` in its transposed layout, :math:`\delta = 10^{-8}`),
so that :math:`s A \tilde g_B` is the least-squares approximation, within the span of A, of the
full weight's gradient. The base optimizer (PEFT: its own AdamW) then steps B and every
non-LoRA leaf with their plain gradients. Embedding-table pairs get the same treatment (in PEFT
their A is formally trainable but never updated, since its step only writes B).

Deviations from PEFT: PEFT computes the projection under bfloat16 autocast when the machine
supports bfloat16 (the test patches that off to compare in float64); here it runs in at least
float32. PEFT's base is Hugging Face's old AdamW (``eps`` added to :math:`\sqrt{v_t}` before the
bias correction; decay applied to the already-updated parameters); the base here is any optax
optimizer (``optax.adamw`` places ``eps`` and the decay as torch's AdamW does). The test runs a
transcription of PEFT's AdamW as the base to compare the rule itself. The per-target scale is one
number ``scaling``; use one ``lora_fa`` per group (``optax.multi_transform``) if targets use
different ``alpha / r``.
"""

import jax
import jax.numpy as jnp
import optax

from jaxpeft.optim import _lora_factors
from jaxpeft.optim._hyperparameter_checks import NON_NEGATIVE, POSITIVE, check_hyperparameters

BaseOptimizer = _lora_factors.BaseOptimizer


def _gram(x: jax.Array) -> jax.Array:
  """x^T x over the last two axes (leading axes, e.g. stacked layers, are batched)."""
  return jnp.einsum("...ir,...is->...rs", x, x)


def damped_pinv(gram: jax.Array, delta: jax.typing.ArrayLike) -> jax.Array:
  """pinv(gram + delta I) over the last two axes, in at least float32."""
  gram = gram.astype(jnp.promote_types(gram.dtype, jnp.float32))
  return jnp.linalg.pinv(gram + delta * jnp.eye(gram.shape[-1], dtype=gram.dtype))


def project_lora_fa_gradients(
    scaling: jax.typing.ArrayLike = 1.0, delta: jax.typing.ArrayLike = 1e-8
) -> optax.GradientTransformation:
  """Replaces each pair's B gradient by (A^T A + delta I)^+ g_B / scaling^2 (A's is left as is).

  Args:
    scaling: the LoRA scale s (``alpha / r``; ``alpha / sqrt(r)`` for rsLoRA).
    delta: damping added to A^T A before the pseudo-inverse.

  Returns:
    A stateless ``optax.GradientTransformation`` that needs ``params``.
  """
  check_hyperparameters("LoRA-FA", POSITIVE, scaling=scaling)
  check_hyperparameters("LoRA-FA", NON_NEGATIVE, delta=delta)

  def project(g_a, g_b, a, b, is_embedding):
    del b, is_embedding
    precond = damped_pinv(_gram(a), delta)
    g = jnp.einsum("...rs,...sj->...rj", precond, g_b.astype(precond.dtype)) / scaling**2
    return g_a, g.astype(g_b.dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("LoRA-FA needs the parameters: call update(grads, state, params).")
    return _lora_factors.map_pairs(project, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _labels(tree):
  frozen = (_lora_factors.A, _lora_factors.EMBEDDING_A)
  return jax.tree.map(lambda role: "frozen" if role in frozen else "trained", _lora_factors.factor_roles(tree))


def lora_fa(
    learning_rate: optax.ScalarOrSchedule,
    scaling: jax.typing.ArrayLike = 1.0,
    delta: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike | None = None,
    *,
    base_optimizer: BaseOptimizer = optax.adamw,
) -> optax.GradientTransformation:
  """LoRA-FA over any base optimizer: A frozen (no optimizer state), B's gradient projected.

  Args:
    learning_rate: the base optimizer's learning rate, float or schedule.
    scaling, delta: see :func:`project_lora_fa_gradients`.
    weight_decay: passed to the base optimizer as ``weight_decay=`` unless None (its default).
    base_optimizer: a factory ``learning_rate -> GradientTransformation`` (PEFT's: AdamW with
      ``eps=1e-6``, no decay). Under ``optax.inject_hyperparams`` name it in ``static_args``.

  Returns:
    An ``optax.GradientTransformation`` whose update needs ``params``.
  """
  base = _lora_factors.build_base("LoRA-FA", base_optimizer, learning_rate, weight_decay)
  return optax.chain(
      project_lora_fa_gradients(scaling, delta),
      optax.multi_transform({"frozen": optax.set_to_zero(), "trained": base}, _labels),
  )
