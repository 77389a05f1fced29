r"""AdaBound's transition: Adam-like per-coordinate learning rates early, SGD's single rate late.

Paper: "Adaptive Gradient Methods with Dynamic Bound of Learning Rate", Luo et al., ICLR 2019,
arXiv:1902.09843, Section 4: the clipped step size :math:`\hat\eta_t = \operatorname{clip}(\eta_t,
\eta_l(t), \eta_u(t))` with bounds closing on ``final_lr``, "behaves like Adam at the beginning as
the bounds have very little impact on learning rates, and it gradually transforms to SGD(M) as the
bounds become more and more restricted".

Setting: noisy mini-batch linear regression (features of very different scales, so Adam's
per-coordinate rates differ widely), ``jaxpeft.optim.scale_by_adabound`` with the paper's
``gamma=1e-3`` and ``final_lr=0.1``. The effective per-coordinate learning rate is read off the
update as :math:`\hat\eta_t = u_t / m_t` (update over momentum). Measured at every step: the spread
:math:`\max\hat\eta / \min\hat\eta` and the fraction of coordinates at a bound.

Checks: early (step ``early_step``) the spread exceeds ``early_spread`` and most coordinates are
unclipped (Adam-like); at the end every rate is within ``late_tolerance`` of ``final_lr``
(SGD-like).
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from experiments.claims.results import ClaimRow, save_figure
from jaxpeft.optim.adabound import scale_by_adabound

NAME = "adabound"


def get_config(small: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "dim": 32,
          "batch_size": 16,
          "learning_rate": 1e-3,
          "final_lr": 0.1,
          "gamma": 1e-3,
          "num_steps": 20_000 if small else 100_000,
          "early_step": 5,
          "early_spread": 10.0,
          "late_tolerance": 0.1,
          "seed": 0,
      }
  )


def effective_rates(c: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per step: spread max/min of the effective rates, fraction at a bound, max |rate / final_lr - 1|."""
  key_w, key_run = jax.random.split(jax.random.key(c.seed))
  scales = jnp.logspace(-2, 1, c.dim)  # feature scales over three decades
  w_true = jax.random.normal(key_w, (c.dim,))
  tx = scale_by_adabound(c.learning_rate, c.final_lr, gamma=c.gamma)

  def loss(w, x, y):
    return 0.5 * jnp.mean((x @ w - y) ** 2)

  def step(carry, key):
    w, state = carry
    x = jax.random.normal(key, (c.batch_size, c.dim)) * scales
    y = x @ w_true + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (c.batch_size,))
    updates, state = tx.update(jax.grad(loss)(w, x, y), state, w)
    rates = jnp.abs(updates / state.mu)
    t = state.count.astype(jnp.float32)
    lower = c.final_lr * (1 - 1 / (c.gamma * t + 1))
    upper = c.final_lr * (1 + 1 / (c.gamma * t))
    clipped = jnp.mean(jnp.isclose(rates, lower, rtol=1e-5) | jnp.isclose(rates, upper, rtol=1e-5))
    deviation = jnp.max(jnp.abs(rates / c.final_lr - 1))
    return (w - updates, state), (jnp.max(rates) / jnp.min(rates), clipped, deviation)

  w0 = jnp.zeros((c.dim,))
  keys = jax.random.split(key_run, c.num_steps)
  scan = jax.jit(lambda carry, ks: jax.lax.scan(step, carry, ks))
  _, (spread, clipped, deviation) = scan((w0, tx.init(w0)), keys)
  return np.asarray(spread), np.asarray(clipped), np.asarray(deviation)


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  spread, clipped, deviation = effective_rates(c)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
  ax1.loglog(np.arange(1, c.num_steps + 1), spread)
  ax1.set_xlabel("step")
  ax1.set_ylabel("max / min effective lr")
  ax2.semilogx(np.arange(1, c.num_steps + 1), clipped)
  ax2.set_xlabel("step")
  ax2.set_ylabel("fraction of coordinates at a bound")
  save_figure(fig, workdir, NAME)
  early = c.early_step - 1
  half = int(np.argmax(clipped >= 0.5)) + 1 if np.any(clipped >= 0.5) else None
  return [
      ClaimRow(
          claim="AdaBound: from Adam to SGD",
          paper="AdaBound behaves like Adam early (bounds inactive) and gradually becomes SGD at final_lr.",
          measurement=(
              f"linear regression, {c.num_steps} steps: effective-lr spread {spread[early]:.3g} at step "
              f"{c.early_step} (clipped {clipped[early]:.0%}), half the coordinates at a bound from step "
              f"{half}, at the end spread {spread[-1]:.3f} and all rates within {deviation[-1]:.1%} of "
              f"final_lr. Plot: {NAME}.png"
          ),
          checks={
              f"Adam-like early: spread > {c.early_spread:g} at step {c.early_step}, most rates unclipped": bool(
                  spread[early] > c.early_spread and clipped[early] < 0.5
              ),
              f"SGD-like late: every rate within {c.late_tolerance:.0%} of final_lr": bool(
                  deviation[-1] < c.late_tolerance
              ),
          },
      )
  ]
