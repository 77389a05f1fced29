r"""AdaBelief's 2-D toy functions: trajectories of SGD (momentum), Adam and AdaBelief.

Paper: "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", Zhuang et
al., NeurIPS 2020, arXiv:2010.07468. Section 2 argues that AdaBelief takes large steps where the
gradient is large but stable (flat curvature: "large gradient, small curvature", e.g.
:math:`|x| + |y|`, where Adam's :math:`\sqrt{v_t}` is large but AdaBelief's :math:`\sqrt{s_t}` is
small), and small steps where the gradient changes fast (high curvature), and its Fig. 3 shows it
reaching the optimum first on three 2-D functions. The functions here are [reconstructed from the
paper's figure, not checked against its source code, which has no toy script]:

.. math::  f_1 = |x| + |y|, \qquad f_2 = |x + y| + |x - y| / 10, \qquad f_3 = (x + y)^2 + (x - y)^2 / 10,

each minimised at the origin; f_2 and f_3 start in the flat valley x + y = 0, at (-2, 2), f_1 at
(-2, 1). Full-batch gradients, the same constant learning rate for all three optimizers; we run
two learning rates (1e-3 and 1e-2, not tuned) and report both. AdaBelief is
`jaxpeft.optim.adabelief` with ``rectify=False`` (the paper's Algorithm 2; the authors' package
rectifies by default, a RAdam-style warm-up that is not part of the toy), Adam `optax.adam`, SGD
`optax.sgd` with momentum 0.9.

Verdict checks: at every learning rate and on every function, AdaBelief gets f below ``tolerance``
in fewer steps than Adam (a run that never gets there ranks after one that does, and among those
that never do, the lower final f ranks first); the same against SGD; and AdaBelief ends below ``tolerance`` everywhere
(stable, no divergence or persistent oscillation).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax

from experiments.claims.results import ClaimRow, save_figure
from jaxpeft.optim.adabelief import adabelief

NAME = "adabelief"

FUNCTIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], tuple[float, float]]] = {
    "|x|+|y|": (lambda p: jnp.abs(p[0]) + jnp.abs(p[1]), (-2.0, 1.0)),
    "|x+y|+|x-y|/10": (lambda p: jnp.abs(p[0] + p[1]) + jnp.abs(p[0] - p[1]) / 10, (-2.0, 2.0)),
    "(x+y)^2+(x-y)^2/10": (lambda p: (p[0] + p[1]) ** 2 + (p[0] - p[1]) ** 2 / 10, (-2.0, 2.0)),
}


def get_config(small: bool) -> ml_collections.ConfigDict:
  del small  # the toy is cheap at full size
  return ml_collections.ConfigDict({"learning_rates": (1e-3, 1e-2), "num_steps": 10_000, "tolerance": 1e-2})


def optimizers(learning_rate: float) -> dict[str, optax.GradientTransformation]:
  return {
      "SGD": optax.sgd(learning_rate, momentum=0.9),
      "Adam": optax.adam(learning_rate),
      "AdaBelief": adabelief(learning_rate, rectify=False),
  }


def trajectory(
    f: Callable[[jax.Array], jax.Array],
    start: tuple[float, float],
    tx: optax.GradientTransformation,
    num_steps: int,
) -> np.ndarray:
  """The iterates (num_steps + 1, 2) of `tx` minimising `f` from `start` with exact gradients."""

  def step(carry, _):
    p, opt_state = carry
    updates, opt_state = tx.update(jax.grad(f)(p), opt_state, p)
    p = optax.apply_updates(p, updates)
    return (p, opt_state), p

  p0 = jnp.asarray(start, jnp.float32)
  _, points = jax.jit(lambda c: jax.lax.scan(step, c, None, length=num_steps))((p0, tx.init(p0)))
  return np.concatenate([np.asarray(p0)[None], np.asarray(points)])


def steps_to_tolerance(values: np.ndarray, tolerance: float) -> int | None:
  """The first step at which `values` is below `tolerance`, or None if never."""
  below = np.flatnonzero(values < tolerance)
  return int(below[0]) if below.size else None


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  steps, finals, paths = {}, {}, {}
  for lr in c.learning_rates:
    for fname, (f, start) in FUNCTIONS.items():
      for oname, tx in optimizers(lr).items():
        points = trajectory(f, start, tx, c.num_steps)
        values = np.asarray(jax.vmap(f)(jnp.asarray(points)))
        key = (lr, fname, oname)
        steps[key], finals[key], paths[key] = steps_to_tolerance(values, c.tolerance), float(values[-1]), points

  fig, axes = plt.subplots(
      len(c.learning_rates),
      len(FUNCTIONS),
      squeeze=False,
      figsize=(3 * len(FUNCTIONS), 2.7 * len(c.learning_rates)),
  )
  grid = np.linspace(-2.5, 2.5, 101)
  xx, yy = np.meshgrid(grid, grid)
  for row, lr in zip(axes, c.learning_rates):
    for ax, (fname, (f, _)) in zip(row, FUNCTIONS.items()):
      ax.contour(xx, yy, np.asarray(jax.vmap(jax.vmap(f))(jnp.stack([xx, yy], -1))), levels=15, linewidths=0.4)
      for oname in optimizers(lr):
        ax.plot(*paths[(lr, fname, oname)][::10].T, lw=1, label=oname)
      ax.plot(0, 0, "x", color="orange", ms=8)
      ax.set_title(f"{fname}, lr={lr:g}", fontsize=8)
  axes[0][0].legend(fontsize=7)
  save_figure(fig, workdir, NAME)

  def race(key) -> float:  # steps to tolerance; runs that never get there rank after, by final value
    return steps[key] if steps[key] is not None else c.num_steps + 1 + finals[key]

  def faster(a: str, b: str) -> bool:
    return all(race((lr, fn, a)) < race((lr, fn, b)) for lr in c.learning_rates for fn in FUNCTIONS)

  measured = "; ".join(
      f"lr={lr:g}, {fn}: "
      + ", ".join(
          f"{o} {steps[(lr, fn, o)] if steps[(lr, fn, o)] is not None else f'never (f={finals[(lr, fn, o)]:.2f})'}"
          for o in optimizers(lr)
      )
      for lr in c.learning_rates
      for fn in FUNCTIONS
  )
  return [
      ClaimRow(
          claim="AdaBelief: 2-D toy functions",
          paper="AdaBelief reaches the optimum fastest on the toy functions (fast in flat regions, stable where"
          " the gradient/curvature is large).",
          measurement=f"steps until f < {c.tolerance:g} (of {c.num_steps}): {measured}. Plot: {NAME}.png",
          checks={
              "AdaBelief before Adam everywhere": faster("AdaBelief", "Adam"),
              "AdaBelief before SGD everywhere": faster("AdaBelief", "SGD"),
              "AdaBelief ends below tolerance everywhere": all(
                  finals[(lr, fn, "AdaBelief")] < c.tolerance for lr in c.learning_rates for fn in FUNCTIONS
              ),
          },
      )
  ]
