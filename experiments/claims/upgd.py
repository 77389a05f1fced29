r"""UPGD keeps its plasticity on a stream of label-permuted tasks where SGD and Adam lose some.

Paper: "Addressing Loss of Plasticity and Catastrophic Forgetting in Continual Learning" (UPGD),
Elsayed & Mahmood, ICLR 2024, arXiv:2404.00781, Section 4 (label-permuted EMNIST / CIFAR-10 /
mini-ImageNet): learning online, one example per step, with the labels re-permuted every few
thousand examples, the average online accuracy per task of SGD and Adam falls from task to task
(loss of plasticity), while UPGD's stays.

Setting (small): scikit-learn's digits, an MLP 64-128-128-10, one example per step, a new random
label permutation every ``steps_per_task`` steps, ``num_tasks`` tasks. Online accuracy is the
prediction on each example before the update, averaged over a task. UPGD with the authors'
beta_utility, sigma and weight decay, at SGD's learning rate; Adam at 1e-3.

Checks: UPGD's mean online accuracy over the last quarter of tasks is at least its mean over the
first quarter minus ``tolerance`` (plasticity kept), and at least SGD's and Adam's over the last
quarter. Whether SGD and Adam themselves lost plasticity at this scale is reported.
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax

from experiments.claims import digits_mlp
from experiments.claims.results import ClaimRow, save_figure
from jaxpeft.optim.upgd import upgd

NAME = "upgd"


def get_config(small: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "hidden": (128, 128),
          "num_tasks": 40 if small else 200,
          "steps_per_task": 500 if small else 1000,
          "sgd_lr": 1e-2,
          "adam_lr": 1e-3,
          "tolerance": 0.02,
          "seed": 0,
      }
  )


def optimizers(c: ml_collections.ConfigDict) -> dict[str, optax.GradientTransformation]:
  return {"UPGD": upgd(c.sgd_lr), "SGD": optax.sgd(c.sgd_lr), "Adam": optax.adam(c.adam_lr)}


def task_accuracies(c: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> np.ndarray:
  """Mean online accuracy of each task of the label-permuted stream."""
  x, y, _, _ = digits_mlp.load()
  key_init, key_perm, key_data = jax.random.split(jax.random.key(c.seed), 3)
  perms = jax.vmap(lambda k: jax.random.permutation(k, digits_mlp.NUM_CLASSES))(
      jax.random.split(key_perm, c.num_tasks)
  )
  params = digits_mlp.init_mlp(key_init, (x.shape[1], *c.hidden, digits_mlp.NUM_CLASSES))
  relabel = lambda step, labels: perms[step // c.steps_per_task][labels]
  _, history = digits_mlp.train(
      tx, params, x, y, num_steps=c.num_tasks * c.steps_per_task, batch_size=1, key=key_data, relabel=relabel
  )
  return history["accuracy"].reshape(c.num_tasks, c.steps_per_task).mean(1)


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  curves = {name: task_accuracies(c, tx) for name, tx in optimizers(c).items()}
  quarter = max(1, c.num_tasks // 4)
  early = {k: float(v[:quarter].mean()) for k, v in curves.items()}
  late = {k: float(v[-quarter:].mean()) for k, v in curves.items()}
  fig, ax = plt.subplots(figsize=(5, 3))
  for name, acc in curves.items():
    ax.plot(np.arange(1, c.num_tasks + 1), acc, label=name)
  ax.set_xlabel("task")
  ax.set_ylabel("online accuracy")
  ax.legend()
  save_figure(fig, workdir, NAME)
  lost = [k for k in ("SGD", "Adam") if late[k] < early[k] - c.tolerance]
  summary = ", ".join(f"{k} {early[k]:.3f} -> {late[k]:.3f}" for k in curves)
  return [
      ClaimRow(
          claim="UPGD: plasticity kept on label-permuted tasks",
          paper="On label-permuted streams SGD and Adam lose plasticity (task accuracy falls); UPGD does not.",
          measurement=(
              f"digits MLP, {c.num_tasks} tasks x {c.steps_per_task} online steps; mean online accuracy, first "
              f"vs last quarter of tasks: {summary}. Lost plasticity here: {', '.join(lost) or 'none'}. "
              f"Plot: {NAME}.png"
          ),
          checks={
              f"UPGD keeps its accuracy (last quarter >= first - {c.tolerance:g})": late["UPGD"]
              >= early["UPGD"] - c.tolerance,
              "UPGD >= SGD and Adam on the last quarter of tasks": late["UPGD"] >= max(late["SGD"], late["Adam"]),
          },
      )
  ]
