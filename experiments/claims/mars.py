r"""MARS-AdamW reaches a lower training loss than AdamW in the same number of steps.

Paper: "MARS: Unleashing the Power of Variance Reduction for Training Large Models", Yuan et al.,
ICML 2025, arXiv:2411.10438, Section 5: with the same learning rate and steps, MARS (its AdamW form,
variance-reduced gradient :math:`c_t = g_t + \gamma\frac{\beta_1}{1-\beta_1}(g_t - g_{t-1})`, clipped)
trains GPT-2 to a lower loss than AdamW throughout.

Setting (small): scikit-learn's digits, an MLP 64-128-128-10, mini-batches of 32, the same
learning rate for both; ``jaxpeft.optim.mars`` (the authors' defaults otherwise: b1 0.95, b2 0.99,
gamma 0.025; its own AdamW for 1-D leaves, as in the authors' default ``optimize_1d=False``)
against ``optax.adamw`` with the same betas, both without weight decay.

The digits MLP fits its training set within a few hundred steps (both losses reach ~0), so the
comparison is on the whole curve: check that MARS's mean training loss over all steps (the area
under the curve, i.e. how fast it trains) and over the last ``window`` steps are below AdamW's.
Test accuracies are reported.
"""

import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax

from experiments.claims import digits_mlp
from experiments.claims.results import ClaimRow, save_figure
from jaxpeft.optim.mars import mars

NAME = "mars"


def get_config(small: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "hidden": (128, 128),
          "num_steps": 600 if small else 3000,
          "batch_size": 32,
          "learning_rate": 1e-3,
          "window": 200,
          "seed": 0,
      }
  )


def optimizers(c: ml_collections.ConfigDict) -> dict[str, optax.GradientTransformation]:
  return {
      "MARS": mars(c.learning_rate, lr_1d=c.learning_rate, weight_decay_1d=0.0),
      "AdamW": optax.adamw(c.learning_rate, b1=0.95, b2=0.99, weight_decay=0.0),
  }


def train_all(c: ml_collections.ConfigDict) -> dict[str, dict]:
  return digits_mlp.train_and_test(
      optimizers(c), hidden=c.hidden, num_steps=c.num_steps, batch_size=c.batch_size, seed=c.seed
  )


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  results = train_all(c)
  final = {k: float(r["loss"][-c.window :].mean()) for k, r in results.items()}
  area = {k: float(r["loss"].mean()) for k, r in results.items()}
  fig, ax = plt.subplots(figsize=(5, 3))
  for name, r in results.items():
    ax.semilogy(np.convolve(r["loss"], np.ones(50) / 50, mode="valid"), label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (50-step mean)")
  ax.legend()
  save_figure(fig, workdir, NAME)
  return [
      ClaimRow(
          claim="MARS: lower training loss than AdamW",
          paper="At the same learning rate and number of steps MARS-AdamW trains to a lower loss than AdamW.",
          measurement=(
              f"digits MLP, {c.num_steps} steps of 32 at lr {c.learning_rate:g}: mean training loss over all "
              "steps "
              f"MARS {area['MARS']:.4g}, AdamW {area['AdamW']:.4g}; over the last {c.window} steps MARS "
              f"{final['MARS']:.3g}, AdamW {final['AdamW']:.3g}; test accuracy MARS "
              f"{results['MARS']['test_accuracy']:.3f}, AdamW {results['AdamW']['test_accuracy']:.3f}. "
              f"Plot: {NAME}.png"
          ),
          checks={
              "MARS's mean training loss over the run is below AdamW's": area["MARS"] < area["AdamW"],
              f"MARS's training loss over the last {c.window} steps is below AdamW's": final["MARS"]
              < final["AdamW"],
          },
      )
  ]
