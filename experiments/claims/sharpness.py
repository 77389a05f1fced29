r"""SAM, ASAM and TRAM against their base optimizer: flatness at equal training loss, and label noise.

Papers: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021, arXiv:2010.01412 (SAM finds flatter minima and is robust to label noise: Section 3.3);
Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
Neural Networks", ICML 2021, arXiv:2102.11600 (ASAM: same claims, with a scale-invariant
neighbourhood, incl. label noise); Sherborne et al., "TRAM: Bridging Trust Regions and Sharpness
Aware Minimization", ICLR 2024, arXiv:2310.03646 (flatter, more transferable minima).

Setting: the quickstart digits CNN (configs/quickstart.py), batch 64, constant learning rate, the
base optimizer SGD with momentum 0.9 for every method (the base of SAM's own experiments).
Radii are the papers' defaults, not tuned here: SAM rho=0.05, ASAM rho=0.5 (its code's default),
TRAM-θ_{t-1} (its radius is the batch KL between consecutive steps' predictions, computed by the
harness's train step).

1. Flatness at equal training loss: each method trains on the clean training split until the
   loss over the whole split is at most ``stop_loss`` (checked every 25 steps); then the sharpness
   is the mean, over ``num_directions`` Gaussian directions d (the same for every method),
   of :math:`L(w + r\,d/\lVert d\rVert) - L(w)` on the training split, with the fixed norm r
   (``radius``) over all parameters.
2. Label noise: each method trains ``noise_steps`` steps on the training split with a fraction of
   its labels flipped (`config.dataset.label_noise`, the test labels stay clean); we report the
   clean test accuracy. Nothing is selected on the test split.

Verdict checks per method: sharpness below the base optimizer's, and test accuracy above the base
optimizer's at every noise level.
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax

from experiments.claims.digits_task import DigitsTask
from experiments.claims.results import ClaimRow, save_figure
from jaxpeft.optim.sam import sam
from jaxpeft.optim.tram import tram
from jaxpeft.train.state import TrainState

NAME = "sharpness"
BASE = "SGD"


def get_config(small: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "learning_rate": 0.05,
          "momentum": 0.9,
          "sam_rho": 0.05,
          "asam_rho": 0.5,
          "stop_loss": 0.02,
          "max_steps": 1500,
          "radius": 10.0,  # about half the trained weights' norm (~18); set from SGD's run alone
          "num_directions": 5 if small else 20,
          "label_noise": (0.3,) if small else (0.2, 0.4),
          "noise_steps": 600 if small else 1500,
          "seed": 0,
      }
  )


def optimizers(c: ml_collections.ConfigDict) -> dict[str, optax.GradientTransformation]:
  base = lambda: optax.sgd(c.learning_rate, momentum=c.momentum)
  return {
      BASE: base(),
      "SAM": sam(rho=c.sam_rho, base_optimizer=base()),
      "ASAM": sam(rho=c.asam_rho, adaptive=True, base_optimizer=base()),
      "TRAM": tram(base_optimizer=base()),
  }


def random_directions(params: optax.Params, num: int, seed: int) -> list[optax.Params]:
  """`num` Gaussian directions with the structure of `params`, each of unit global norm."""
  directions = []
  for key in jax.random.split(jax.random.key(seed), num):
    leaves, treedef = jax.tree.flatten(params)
    noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(jax.random.split(key, len(leaves)), leaves)]
    d = jax.tree.unflatten(treedef, noise)
    directions.append(jax.tree.map(lambda x, n=optax.tree.norm(d): x / n, d))
  return directions


def sharpness(task: DigitsTask, state: TrainState, directions: list[optax.Params], radius: float) -> float:
  """Mean training-loss increase when the trained parameters move by `radius` along each direction."""
  loss = task.evaluate(state, task.train_source)["loss"]
  increases = [
      task.evaluate(
          state.replace(params=jax.tree.map(lambda w, d: w + radius * d, state.params, direction)),
          task.train_source,
      )["loss"]
      - loss
      for direction in directions
  ]
  return float(np.mean(increases))


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  task = DigitsTask()
  results = {}
  for name, tx in optimizers(c).items():
    state, losses = task.train(tx, c.max_steps, stop_loss=c.stop_loss)
    directions = random_directions(state.params, c.num_directions, c.seed)
    r = {
        "steps": len(losses),
        "train_loss": task.evaluate(state, task.train_source)["loss"],
        "sharpness": sharpness(task, state, directions, c.radius),
        "noisy_accuracy": {},
    }
    for noise in c.label_noise:
      noisy_state, _ = task.train(tx, c.noise_steps, task.noisy_train_source(noise))
      r["noisy_accuracy"][noise] = task.evaluate(noisy_state, task.test_source)["accuracy"]
    results[name] = r

  fig, (ax_sharp, ax_noise) = plt.subplots(1, 2, figsize=(9, 3.2))
  names = list(results)
  ax_sharp.bar(names, [results[n]["sharpness"] for n in names])
  ax_sharp.set_ylabel(f"loss increase at |dw|={c.radius:g}")
  ax_sharp.set_title(f"flatness at train loss <= {c.stop_loss:g}")
  width = 0.8 / len(c.label_noise)
  for i, noise in enumerate(c.label_noise):
    ax_noise.bar(
        np.arange(len(names)) + i * width,
        [100 * results[n]["noisy_accuracy"][noise] for n in names],
        width,
        label=f"{100 * noise:.0f}% flipped",
    )
  ax_noise.set_xticks(np.arange(len(names)) + width * (len(c.label_noise) - 1) / 2, names)
  ax_noise.set_ylabel("clean test accuracy (%)")
  ax_noise.set_ylim(min(100 * min(r["noisy_accuracy"].values()) for r in results.values()) - 5, 100)
  ax_noise.legend(fontsize=7)
  save_figure(fig, workdir, NAME)

  def describe(name: str) -> str:
    r = results[name]
    accuracies = ", ".join(f"{100 * a:.1f}% at {100 * n:.0f}% noise" for n, a in r["noisy_accuracy"].items())
    return (
        f"{name}: sharpness {r['sharpness']:.3f} (train loss {r['train_loss']:.3f} after {r['steps']} steps),"
        f" test acc {accuracies}"
    )

  base = results[BASE]
  papers = {
      "SAM": "SAM (Foret et al. 2021) finds flatter minima and is robust to label noise.",
      "ASAM": "ASAM (Kwon et al. 2021): adaptive sharpness gives flatter minima, better generalization and"
      " robustness to label noise.",
      "TRAM": "TRAM (Sherborne et al. 2024): trust-region-aware SAM reaches flatter minima that generalize better.",
  }
  rows = []
  for name, paper in papers.items():
    r = results[name]
    checks = {f"sharpness < {BASE}'s": r["sharpness"] < base["sharpness"]}
    for noise in c.label_noise:
      better = r["noisy_accuracy"][noise] > base["noisy_accuracy"][noise]
      checks[f"test acc > {BASE}'s at {100 * noise:.0f}% noise"] = better
    rows.append(
        ClaimRow(
            claim=f"{name} vs {BASE}: flatness, label noise",
            paper=paper,
            measurement=f"digits CNN, loss increase at random |dw|={c.radius:g} (mean of {c.num_directions} directions)."
            f" {describe(name)}; {describe(BASE)}. Plot: {NAME}.png",
            checks=checks,
        )
    )
  return rows
