r"""Model merging at small scale: one pretrained ViT, four digit domains, every jaxpeft.merging method.

  nice -n 5 python -m experiments.merging --out_dir=experiments/results

1. Pretrains the digits ViT (`configs/digits_vit.py`'s model, 10 classes) on clean digits.
2. Fine-tunes it on four tasks, the digits under a fixed domain shift (`jaxpeft.data.domain_shift`):
   inverted, rotated by 90 degrees, transposed, rotated and inverted; each task keeps its own 10-class
   head (as in the TIES and aTLAS papers, only the backbone is merged). Twice: every parameter ("full") and
   a rank-4 LoRA on every attention and MLP kernel, merged into the weights ("lora").
3. Merges the four backbones with every method and reports per-task and average normalised accuracy,
   merged / individually fine-tuned (test split). Scales λ are picked on a validation slice of train
   (average accuracy over the tasks); aTLAS learns its coefficients on 10 labelled validation images per
   class and task; Fisher and RegMean use 256 training images per task.
4. Checks the papers' claims in code (`check_claims`) and writes `<out_dir>/merging.md` and
   `<out_dir>/merging.png`.

`--smoke` runs a tiny model for a few steps (the test suite's check that the script works end to end).
"""

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import sklearn.datasets
from absl import app, flags

from jaxpeft import merging
from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.data import digits, domain_shift
from jaxpeft.merging.coefficients import fit_coefficients
from jaxpeft.models.vit import ViT

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

_OUT_DIR = flags.DEFINE_string("out_dir", "experiments/results", "Where merging.md and merging.png go.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny model and a few steps (tests).")

TASKS = {
    "invert": ("invert",),
    "rotate90": ("rotate90",),
    "transpose": ("transpose",),
    "rotate90+invert": ("rotate90", "invert"),
}
HEAD = "head"
VALIDATION = 287  # train images held out for choosing λ and for aTLAS' few-shot set
LORA = AdapterConfig(
    targets=r"block_\d+/(attention/(query|key|value|out)|mlp/fc\d)/kernel",
    rank=4,
    alpha=8.0,
    init="default",
    fan_in_axes=((r".*attention/(query|key|value)/kernel", 1), (r".*attention/out/kernel", 2)),
)
SCALES = {"task_arithmetic": (0.2, 0.3, 0.5, 0.7, 1.0), "ties": (0.6, 0.8, 1.0, 1.2, 1.5)}
SCALES["dare_ties"] = SCALES["ties"]
METHODS = ("averaging", "greedy_soup", "task_arithmetic", "ties", "dare_ties", "fisher", "regmean", "atlas")

Data = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images, labels)


def settings(smoke: bool) -> dict[str, Any]:
  if smoke:
    model = dict(num_classes=10, patch_size=2, hidden=8, depth=1, num_heads=2, mlp_dim=8)
    return dict(model=model, pretrain_steps=5, finetune_steps=3, atlas_steps=3, stats_examples=16, batch=32)
  model = dict(num_classes=10, patch_size=2, hidden=32, depth=2, num_heads=4, mlp_dim=64)
  return dict(model=model, pretrain_steps=800, finetune_steps=300, atlas_steps=150, stats_examples=256, batch=64)


def load_tasks() -> tuple[Data, dict[str, Data]]:
  """Clean digits and each task's shifted digits: train (minus validation), validation, test."""
  raw = sklearn.datasets.load_digits()
  images = (raw.images[..., None] / digits.MAX_PIXEL).astype(np.float32)
  split = digits.split_indices()
  rows = {"train": split["train"][:-VALIDATION], "validation": split["train"][-VALIDATION:], "test": split["test"]}
  clean = {name: (images[r], raw.target[r].astype(np.int32)) for name, r in rows.items()}
  tasks = {}
  for task, shifts in TASKS.items():
    tasks[task] = {}
    for name, (x, y) in clean.items():
      batch = {"image": x, "label": y}
      for shift in shifts:
        batch = domain_shift.apply_shift(batch, shift)
      tasks[task][name] = (batch["image"], batch["label"])
  return clean, tasks


def split_head(params: Any) -> tuple[Any, Any]:
  backbone = {k: v for k, v in params.items() if k != HEAD}
  return backbone, params[HEAD]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(
    loss_fn: Callable,
    trained: Any,
    data: tuple[np.ndarray, np.ndarray],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> Any:
  """``trained`` after ``steps`` AdamW steps (cosine schedule) on random batches of ``data``."""
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.0)
  rng = np.random.default_rng(seed)
  x, y = data
  batches = ((x[idx], y[idx]) for idx in (rng.integers(0, len(y), batch) for _ in range(steps)))
  return fit_coefficients(trained, lambda t, _, b: loss_fn(t, *b), batches, tx)


class Experiment:
  """The pretrained model, the fine-tunes of one kind and the evaluation of merged backbones."""

  def __init__(self, model: ViT, tasks: dict[str, Data], cfg: dict[str, Any]):
    self.model, self.tasks, self.cfg = model, tasks, cfg
    self._accuracy = jax.jit(
        lambda backbone, head, x, y: jnp.mean(jnp.argmax(self.apply({**backbone, HEAD: head}, x), -1) == y)
    )

  def apply(self, params: Any, x: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, x)

  def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return cross_entropy(self.apply(params, x), y)

  def finetune(self, pretrained: Any, kind: str, seed: int) -> list[Any]:
    """One fine-tuned parameter tree per task (LoRA merged into the weights)."""
    models = []
    for i, data in enumerate(self.tasks.values()):
      steps, batch = self.cfg["finetune_steps"], self.cfg["batch"]
      if kind == "full":
        models.append(train(self.loss, pretrained, data["train"], steps, 1e-3, batch, seed + i))
        continue
      backbone, head = split_head(pretrained)
      adapter = reparam.init(jax.random.key(seed + i), LORA, backbone)
      loss = lambda t, x, y: self.loss({**reparam.apply(backbone, t["adapter"], LORA), HEAD: t[HEAD]}, x, y)
      t = train(loss, {"adapter": adapter, HEAD: head}, data["train"], steps, 1e-2, batch, seed + i)
      models.append({**reparam.merge(backbone, t["adapter"], LORA), HEAD: t[HEAD]})
    return models

  def accuracy(self, backbone: Any, head: Any, data: tuple[np.ndarray, np.ndarray]) -> float:
    return float(self._accuracy(backbone, head, *data))

  def accuracies(self, backbone: Any, heads: Sequence[Any], split: str) -> list[float]:
    return [self.accuracy(backbone, h, d[split]) for h, d in zip(heads, self.tasks.values())]

  def best_scale(self, merge: Callable[[float], Any], scales: Sequence[float], heads: Sequence[Any]) -> Any:
    """The merge whose scale gives the best average validation accuracy."""
    scored = [(np.mean(self.accuracies(merge(s), heads, "validation")), s) for s in scales]
    return merge(max(scored)[1])

  def merges(self, pretrained: Any, models: list[Any]) -> dict[str, Any]:
    """Method -> merged backbone."""
    base, _ = split_head(pretrained)
    backbones, heads = zip(*[split_head(m) for m in models])
    backbones, heads = list(backbones), list(heads)
    n = self.cfg["stats_examples"]
    out = {"averaging": merging.uniform_soup(backbones)}
    out["greedy_soup"] = merging.greedy_soup(
        backbones, lambda b: np.mean(self.accuracies(b, heads, "validation"))
    )[0]
    out["task_arithmetic"] = self.best_scale(
        lambda s: merging.task_arithmetic(base, backbones, s), SCALES["task_arithmetic"], heads
    )
    out["ties"] = self.best_scale(
        lambda s: merging.ties(base, backbones, 1.0, 0.2, scale=s), SCALES["ties"], heads
    )
    key = jax.random.key(0)
    out["dare_ties"] = self.best_scale(
        lambda s: merging.dare(base, backbones, 1.0, 0.5, key=key, combination="ties", scale=s),
        SCALES["dare_ties"],
        heads,
    )
    fishers = []
    for model, data in zip(models, self.tasks.values()):
      x = data["train"][0][:n]
      fisher = merging.expected_fisher(lambda p, ex: self.apply(p, ex[None])[0], model, [x])
      fishers.append(split_head(fisher)[0])
    out["fisher"] = merging.fisher_merge(backbones, fishers)
    grams = [
        merging.gram_matrices(self.apply, m, [d["train"][0][:n]]) for m, d in zip(models, self.tasks.values())
    ]
    out["regmean"] = merging.regmean(backbones, grams)
    out["atlas"] = self.atlas(base, backbones, heads)
    return out

  def atlas(self, base: Any, backbones: list[Any], heads: list[Any]) -> Any:
    """aTLAS with one coefficient per task and block, learned on 10 labelled validation images per class."""
    shots = []
    for data in self.tasks.values():
      x, y = data["validation"]
      idx = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(10)])
      shots.append((x[idx], y[idx]))
    batch = (np.stack([x for x, _ in shots]), np.stack([y for _, y in shots]))

    def loss(backbone, batch):
      return sum(self.loss({**backbone, HEAD: h}, x, y) for h, x, y in zip(heads, batch[0], batch[1])) / len(heads)

    task_vectors = [merging.task_vector(b, base) for b in backbones]
    coefficients = merging.fit_atlas(
        base, task_vectors, loss, [batch] * self.cfg["atlas_steps"], optax.adam(0.05), init=0.3
    )
    return merging.atlas_merge(base, task_vectors, coefficients)


def check_claims(average: dict[str, float], kind: str) -> list[tuple[str, bool, str]]:
  """`(claim, holds, numbers)` on the average normalised accuracies of one kind of fine-tune."""
  pct = lambda m: f"{m} {100 * average[m]:.1f}%"
  return [
      (
          f"{kind}: TIES > task arithmetic > averaging",
          average["ties"] > average["task_arithmetic"] > average["averaging"],
          ", ".join(pct(m) for m in ("ties", "task_arithmetic", "averaging")),
      ),
      (
          f"{kind}: Fisher >= averaging",
          average["fisher"] >= average["averaging"],
          f"{pct('fisher')}, {pct('averaging')}",
      ),
      (
          f"{kind}: aTLAS >= task arithmetic",
          average["atlas"] >= average["task_arithmetic"],
          f"{pct('atlas')}, {pct('task_arithmetic')}",
      ),
  ]


def run(smoke: bool = False) -> dict[str, dict[str, list[float]]]:
  """`{kind: {"individual" | "pretrained" | method: [test accuracy per task]}}` for kind in full, lora."""
  cfg = settings(smoke)
  clean, tasks = load_tasks()
  model = ViT(**cfg["model"])
  init = model.init(jax.random.key(0), clean["train"][0][:1])["params"]
  experiment = Experiment(model, tasks, cfg)
  pretrained = train(experiment.loss, init, clean["train"], cfg["pretrain_steps"], 3e-3, cfg["batch"], 0)
  results = {}
  for kind in ("full", "lora"):
    models = experiment.finetune(pretrained, kind, seed=100)
    heads = [split_head(m)[1] for m in models]
    rows = {
        "individual": [experiment.accuracy(*split_head(m), d["test"]) for m, d in zip(models, tasks.values())],
        "pretrained": experiment.accuracies(split_head(pretrained)[0], heads, "test"),
    }
    for method, backbone in experiment.merges(pretrained, models).items():
      rows[method] = experiment.accuracies(backbone, heads, "test")
    results[kind] = rows
  return results


def normalised(rows: dict[str, list[float]]) -> dict[str, list[float]]:
  """Merged / individually fine-tuned accuracy, per task."""
  return {m: [a / b for a, b in zip(accs, rows["individual"])] for m, accs in rows.items() if m != "individual"}


def report(results: dict[str, dict[str, list[float]]], seconds: float, command: str) -> tuple[str, plt.Figure]:
  """The markdown (tables, claims) and the figure."""
  lines = [
      "# Model merging: four digit domains, one pretrained ViT",
      "",
      f"Command: `{command}`  ",
      f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, machine: {platform.machine()}, "
      f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
      f"wall time {seconds / 60:.1f} min.",
      "",
      "Normalised accuracy = merged / individually fine-tuned test accuracy (each task keeps its own head).",
      "",
  ]
  claims = []
  for kind, rows in results.items():
    norm = normalised(rows)
    lines += [f"## {kind} fine-tunes", "", "| method | " + " | ".join(TASKS) + " | average |"]
    lines.append("|---" * (len(TASKS) + 2) + "|")
    lines.append(
        "| individual accuracy | " + " | ".join(f"{100 * a:.1f}%" for a in rows["individual"]) + " | "
        f"{100 * np.mean(rows['individual']):.1f}% |"
    )
    for method, values in norm.items():
      lines.append(
          f"| {method} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {100 * np.mean(values):.1f} |"
      )
    lines.append("")
    claims += check_claims({m: float(np.mean(v)) for m, v in norm.items()}, kind)
  lines += ["## Claims", "", "| claim | holds | numbers (average normalised accuracy) |", "|---|---|---|"]
  lines += [f"| {c} | {'yes' if ok else 'NO'} | {numbers} |" for c, ok, numbers in claims]
  fig, ax = plt.subplots(figsize=(9, 3.5))
  methods = ["pretrained", *METHODS]
  width = 0.4
  for j, (kind, rows) in enumerate(results.items()):
    norm = normalised(rows)
    ax.bar(
        np.arange(len(methods)) + (j - 0.5) * width, [100 * np.mean(norm[m]) for m in methods], width, label=kind
    )
  ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
  ax.set_ylabel("average normalised accuracy (%)")
  ax.axhline(100, color="grey", lw=0.5)
  ax.legend()
  fig.tight_layout()
  return "\n".join(lines) + "\n", fig


def main(argv):
  del argv
  start = time.perf_counter()
  results = run(_SMOKE.value)
  command = "nice -n 5 python -m experiments.merging" + (" --smoke" if _SMOKE.value else "")
  text, fig = report(results, time.perf_counter() - start, command)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, "merging.md"), "w", encoding="utf-8") as f:
    f.write(text)
  fig.savefig(os.path.join(_OUT_DIR.value, "merging.png"), dpi=100)
  print(text)


if __name__ == "__main__":
  app.run(main)
