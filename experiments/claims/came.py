r"""CAME: Adafactor-like optimizer-state memory with an Adam-like training curve.

Paper: "CAME: Confidence-guided Adaptive Memory Efficient Optimization", Luo et al., ACL 2023,
arXiv:2307.02047: CAME keeps factored second moments (and factored instability statistics) like
Adafactor, so its memory stays close to Adafactor's (which the paper runs with momentum,
beta1=0.9) and far below Adam's, while its convergence matches or beats Adam's.

Measured on the quickstart digits CNN (configs/quickstart.py), every optimizer at the same constant
learning rate and batches: optimizer-state bytes per trained parameter (every array of the optax
state, counted by its `nbytes`), the training-loss curve and the test accuracy.
`jaxpeft.optim.came` factors every parameter with two or more axes; `optax.adafactor` factors only
matrices whose two largest axes are both >= 128 (here the 1024x128 dense kernel, 90% of the
parameters), so the convolution kernels keep full second moments there.

Verdict checks: CAME's bytes/parameter are at most 1.25x those of Adafactor with momentum and at
most 0.6x Adam's; CAME's final training loss (mean of the last 10% of steps) is at most 1.5x
Adam's + 0.02 and its test accuracy within 3 points of Adam's.
"""

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax

from experiments.claims.digits_task import DigitsTask
from experiments.claims.results import ClaimRow, save_figure
from jaxpeft.optim.came import came

NAME = "came"


def get_config(small: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "learning_rate": 1e-3,
          "num_steps": 300 if small else 1500,
          "smoothing": 20,  # steps in the moving average of the plotted loss
      }
  )


def optimizers(learning_rate: float) -> dict[str, optax.GradientTransformation]:
  return {
      "Adam": optax.adam(learning_rate),
      "CAME": came(learning_rate),
      "Adafactor (beta1=0.9)": optax.adafactor(learning_rate, momentum=0.9, multiply_by_parameter_scale=False),
      "Adafactor (no momentum)": optax.adafactor(learning_rate, multiply_by_parameter_scale=False),
  }


def state_bytes_per_param(opt_state: optax.OptState, params: optax.Params) -> float:
  """Bytes of every array in the optimizer state, per trained scalar parameter."""
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
  return state_bytes / sum(x.size for x in jax.tree.leaves(params))


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
  return np.convolve(x, np.ones(window) / window, mode="valid")


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  task = DigitsTask()
  results = {}
  for name, tx in optimizers(c.learning_rate).items():
    state, losses = task.train(tx, c.num_steps)
    results[name] = {
        "bytes": state_bytes_per_param(state.opt_state, state.params),
        "losses": losses,
        "final_loss": float(np.mean(losses[-max(1, c.num_steps // 10) :])),
        "accuracy": task.evaluate(state, task.test_source)["accuracy"],
    }

  fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.2))
  for name, r in results.items():
    ax_loss.plot(_smooth(r["losses"], c.smoothing), label=name)
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel(f"train loss ({c.smoothing}-step mean)")
  ax_loss.legend(fontsize=7)
  ax_mem.barh(list(results), [r["bytes"] for r in results.values()])
  ax_mem.set_xlabel("optimizer-state bytes / parameter")
  save_figure(fig, workdir, NAME)

  adam, came_r, adafactor = results["Adam"], results["CAME"], results["Adafactor (beta1=0.9)"]
  measured = "; ".join(
      f"{name}: {r['bytes']:.2f} B/param, final loss {r['final_loss']:.3f},"
      f" test acc {100 * r['accuracy']:.1f}%"
      for name, r in results.items()
  )
  return [
      ClaimRow(
          claim="CAME: memory and convergence",
          paper="Memory cost close to Adafactor's, far below Adam's, with convergence on par with (or better than) Adam.",
          measurement=f"digits CNN, {c.num_steps} steps at lr {c.learning_rate:g}: {measured}. Plot: {NAME}.png",
          checks={
              "state bytes <= 1.25x Adafactor (beta1=0.9)": came_r["bytes"] <= 1.25 * adafactor["bytes"],
              "state bytes <= 0.6x Adam": came_r["bytes"] <= 0.6 * adam["bytes"],
              "final train loss <= 1.5x Adam + 0.02": came_r["final_loss"] <= 1.5 * adam["final_loss"] + 0.02,
              "test accuracy within 3 points of Adam": came_r["accuracy"] >= adam["accuracy"] - 0.03,
          },
      )
  ]
