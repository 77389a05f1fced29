r"""LoRA+: a larger learning rate for the LoRA factor B than for A.

Paper: "LoRA+: Efficient Low Rank Adaptation of Large Models", Soufiane Hayou, Nikhil Ghosh,
Bin Yu, ICML 2024, arXiv:2402.12354.

Reference implementation followed: Hugging Face PEFT's ``peft.optimizers.create_loraplus_optimizer``
(0.21), which puts the parameters in learning-rate groups:

* LoRA factors of embedding tables (both A and B): ``loraplus_lr_embedding`` (default 1e-6);
* LoRA B factors, *and every other one-dimensional trainable parameter* (biases, norm scales):
  ``lr * loraplus_lr_ratio``;
* everything else (LoRA A, other matrices): ``lr``.

For a base optimizer whose step is proportional to its learning rate (SGD, Adam, AdamW with
decoupled decay ``lr * wd``, Lion, ...) a group learning rate :math:`c \cdot \alpha` is the same as
multiplying that group's update by :math:`c`, which is what :func:`scale_by_loraplus` does after
the base optimizer: it reads the adapter tree (``{"a": ..., "b": ...}`` under each target, under
``embedding`` for tables; see ``jaxpeft/optim/_lora_factors.py``), so it needs no model code. For
optimizers whose step is not proportional to the learning rate (AdaBound, AdaMod, SWATS here),
scaling the update is not the same as scaling their learning rate.

Deviations from PEFT: the embedding factors' learning rate is ``loraplus_lr_embedding`` at every
step (their update is scaled by ``loraplus_lr_embedding / learning_rate(count)``); with a torch
scheduler PEFT scales it like the other groups. PEFT's ``loraplus_weight_decay`` (a decay shared by
all groups but the 1-D ones) is the base optimizer's decay here: mask it with the base optimizer's
own ``mask`` if 1-D parameters should not decay.
"""

import jax
import jax.numpy as jnp
import optax

from jaxpeft.optim import _lora_factors
from jaxpeft.optim._hyperparameter_checks import NON_NEGATIVE, POSITIVE, check_hyperparameters

BaseOptimizer = _lora_factors.BaseOptimizer


def scale_by_loraplus(
    learning_rate: optax.ScalarOrSchedule,
    loraplus_lr_ratio: jax.typing.ArrayLike = 16.0,
    loraplus_lr_embedding: jax.typing.ArrayLike = 1e-6,
) -> optax.GradientTransformation:
  """Scales the base optimizer's updates to LoRA+'s group learning rates (see module doc).

  Args:
    learning_rate: the base optimizer's learning rate (float or schedule); only used to turn
      ``loraplus_lr_embedding`` into a scale.
    loraplus_lr_ratio: eta_B / eta_A, applied to the B factors and to 1-D leaves.
    loraplus_lr_embedding: learning rate of the factors of embedding tables.

  Returns:
    An ``optax.GradientTransformation`` whose state is the step count.
  """
  check_hyperparameters("LoRA+", POSITIVE, loraplus_lr_ratio=loraplus_lr_ratio)
  check_hyperparameters("LoRA+", NON_NEGATIVE, loraplus_lr_embedding=loraplus_lr_embedding)

  def init_fn(params: optax.Params) -> optax.ScaleByScheduleState:
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(
      updates: optax.Updates, state: optax.ScaleByScheduleState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.ScaleByScheduleState]:
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    embedding_scale = jnp.where(lr > 0, loraplus_lr_embedding / jnp.where(lr > 0, lr, 1.0), 0.0)

    def scale(role: str, u: jax.Array) -> jax.Array:
      if role in (_lora_factors.EMBEDDING_A, _lora_factors.EMBEDDING_B):
        return (u * embedding_scale).astype(u.dtype)
      if role == _lora_factors.B or (role == _lora_factors.OTHER and u.ndim == 1):
        return (u * loraplus_lr_ratio).astype(u.dtype)
      return u

    roles = _lora_factors.factor_roles(updates)
    new_updates = jax.tree.map(scale, roles, updates)
    return new_updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def loraplus(
    learning_rate: optax.ScalarOrSchedule,
    loraplus_lr_ratio: jax.typing.ArrayLike = 16.0,
    loraplus_lr_embedding: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike | None = None,
    *,
    base_optimizer: BaseOptimizer = optax.adamw,
) -> optax.GradientTransformation:
  """LoRA+ over any base optimizer: ``chain(base_optimizer(learning_rate), scale_by_loraplus(...))``.

  Example::

    tx = loraplus(2e-4, loraplus_lr_ratio=16.0)                    # AdamW, B factors at 3.2e-3
    tx = loraplus(2e-4, base_optimizer=lambda lr: jaxpeft.optim.sam(rho=0.05, base_optimizer=optax.adam(lr)))

  Args:
    learning_rate: the base learning rate (of the A factors), float or schedule.
    loraplus_lr_ratio: eta_B / eta_A (PEFT has no default; 16 = 2**4 is the paper's suggestion).
    loraplus_lr_embedding: learning rate of embedding-table factors (PEFT's default 1e-6).
    weight_decay: passed to the base optimizer as ``weight_decay=`` unless None (its default).
    base_optimizer: a factory ``learning_rate -> GradientTransformation``, e.g.
      ``functools.partial(optax.adamw, weight_decay=0.0)``. Under ``optax.inject_hyperparams`` name
      it in ``static_args``.

  Returns:
    An ``optax.GradientTransformation`` (``...ExtraArgs`` if the base needs extra arguments).
  """
  return optax.chain(
      _lora_factors.build_base("LoRA+", base_optimizer, learning_rate, weight_decay),
      scale_by_loraplus(learning_rate, loraplus_lr_ratio, loraplus_lr_embedding),
  )
