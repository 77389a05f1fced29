r"""SWATS switches from Adam to SGD by itself, and picks SGD's learning rate from Adam's steps.

Paper: "Improving Generalization Performance by Switching from Adam to SGD", Keskar & Socher, 2017,
arXiv:1712.07628, Section 3 and Table 2: during training the projection
:math:`\gamma_k = p_k^\top p_k / (-p_k^\top g_k)` of Adam's step onto the gradient is averaged,
:math:`\lambda_k`; when :math:`|\lambda_k / (1-\beta_2^k) - \gamma_k| < \epsilon` the method switches to
SGD with momentum at learning rate :math:`\Lambda = \lambda_k / (1-\beta_2^k)`, and it does switch on
every task of the paper (the switchover points and the learning rates are tabulated), with a final
accuracy close to or better than Adam's.

Setting (small): scikit-learn's digits, an MLP 64-128-128-10, mini-batches of 32,
``jaxpeft.optim.swats`` with the paper's defaults (Adam phase lr 1e-3) against ``optax.adam(1e-3)``.

Checks: the switch happens within the run (step reported, with :math:`\Lambda`); after the switch
the training loss keeps falling (mean over the last ``window`` steps below the mean over the
``window`` steps before the switch); test accuracy within ``accuracy_gap`` of Adam's.
"""

import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax

from experiments.claims import digits_mlp
from experiments.claims.results import ClaimRow, save_figure
from jaxpeft.optim.swats import swats

NAME = "swats"


def get_config(small: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "hidden": (128, 128),
          "num_steps": 4000 if small else 20_000,
          "batch_size": 32,
          "learning_rate": 1e-3,
          "window": 200,
          "accuracy_gap": 0.02,
          "seed": 0,
      }
  )


def train_both(c: ml_collections.ConfigDict) -> dict[str, dict]:
  """Per optimizer: training history (SWATS records its SGD lr, 0 before the switch) and test accuracy."""
  # swats() = chain(add_decayed_weights, scale_by_swats, scale(-1)): the SwatsState is the second.
  return digits_mlp.train_and_test(
      {"SWATS": swats(c.learning_rate), "Adam": optax.adam(c.learning_rate)},
      hidden=c.hidden,
      num_steps=c.num_steps,
      batch_size=c.batch_size,
      seed=c.seed,
      records={"SWATS": lambda state: state[1].sgd_lr},
  )


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  results = train_both(c)
  swats_run, adam = results["SWATS"], results["Adam"]
  switched = np.flatnonzero(swats_run["record"] > 0)
  switch = int(switched[0]) + 1 if switched.size else None
  sgd_lr = float(swats_run["record"][-1])
  fig, ax = plt.subplots(figsize=(5, 3))
  smooth = lambda v: np.convolve(v, np.ones(50) / 50, mode="valid")
  for name, r in results.items():
    ax.semilogy(smooth(r["loss"]), label=name)
  if switch:
    ax.axvline(switch, color="gray", linestyle=":", label=f"switch (step {switch})")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (50-step mean)")
  ax.legend()
  save_figure(fig, workdir, NAME)
  keeps_falling = False
  if switch and switch + c.window <= c.num_steps:
    before = swats_run["loss"][max(0, switch - c.window) : switch].mean()
    keeps_falling = bool(swats_run["loss"][-c.window :].mean() < before)
  return [
      ClaimRow(
          claim="SWATS: switches from Adam to SGD",
          paper="SWATS switches to SGD on its own, with a learning rate estimated from Adam's steps, and "
          "ends close to or above Adam's accuracy.",
          measurement=(
              f"digits MLP, {c.num_steps} steps of 32: switch at step {switch} with SGD lr {sgd_lr:.3g}; "
              f"test accuracy SWATS {swats_run['test_accuracy']:.3f}, Adam {adam['test_accuracy']:.3f}. "
              f"Plot: {NAME}.png"
          ),
          checks={
              "the switch happens within the run": switch is not None,
              f"training loss keeps falling after the switch ({c.window}-step means)": keeps_falling,
              f"test accuracy within {c.accuracy_gap:g} of Adam's": swats_run["test_accuracy"]
              >= adam["test_accuracy"] - c.accuracy_gap,
          },
      )
  ]
