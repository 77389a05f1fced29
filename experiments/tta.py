r"""Test-time adaptation results on corrupted Fashion-MNIST: error per corruption, method and setting; claims.

  nice -n 5 python -m experiments.tta --workdir=workdir/tta [--num_images=128] [--pretrain_steps=500]

1. Pretrains `configs/fashion_resnet.py` (the BatchNorm ResNet) on clean Fashion-MNIST train, unless
   `--pretrained` names a finished launch/train.py run.
2. Runs every method registered in `jaxpeft.tta.METHODS` (or `--methods`) with its launch config
   (`configs/tta_<method>.py`: optimizer and options; the method's defaults where there is no such file)
   plus the cost cuts of `EXPERIMENT_OPTIONS`, in each setting of `SETTINGS`, on the first `--num_images`
   test images corrupted at severity 5. Clean labelled training images go to methods with a `prepare`.
3. Writes `<workdir>/tta.md` (tables and the claims of experiments/claims/tta.py), `<workdir>/tta.json`
   and `<workdir>/tta_continual.png` (running online error along the continual stream).

A method that refuses a setting (BN-adapt with one image per batch) is reported with its error message.
"""

import importlib
import json
import os
import time

import matplotlib
import numpy as np
from absl import app, flags

from configs import fashion_resnet
from experiments.claims.tta import check_claims
from jaxpeft.data import corruptions, input_pipeline, tta_streams
from jaxpeft.models.registry import build_model
from jaxpeft.train import tta_loop
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.tta import METHODS, runner

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

SEVERITY = 5
CLEAN_IMAGES = 512  # labelled clean training images for methods with a `prepare` (EATA, RMT)
# Settings: (stream builder, Dirichlet concentration or 0, batch size or None for --batch_size). 'mixed'
# streams give every image its own corruption, drawn from a pool of num_images x 12 test images (an eighth
# of it at batch size 1). 'non_iid' deals each class over time slots one batch long, so with Dirichlet(0.1)
# a batch holds one or two classes (with 10 slots, one per class, a 64-image batch of a 128-image stream
# still held about 8 of the 10 classes).
SETTINGS = {
    "one_at_a_time": ("one_at_a_time", 0.0, None),
    "continual": ("continual", 0.0, None),
    "non_iid": ("one_at_a_time", 0.1, None),
    "mixed": ("mixed", 0.0, None),
    "mixed_bs1": ("mixed", 0.0, 1),
}
# Cost cuts for a 2-core CPU (stated in the results): fewer CoTTA augmentations, a shorter RMT warm-up.
EXPERIMENT_OPTIONS = {"cotta": {"num_augmentations": 4}, "rmt": {"warmup_samples": 1024}}


def method_setup(method: str) -> tuple[dict, dict]:
  """`(optimizer config, options)` of `configs/tta_<method>.py` (if any) with `EXPERIMENT_OPTIONS`."""
  try:
    config = importlib.import_module(f"configs.tta_{method}").get_config()
    optimizer, options = config.optimizer, dict(config.options)
  except ModuleNotFoundError:
    optimizer, options = None, {}
  return optimizer, {**options, **EXPERIMENT_OPTIONS.get(method, {})}


def _stream(setting, images, labels, batch_size, seed=0):
  builder, dirichlet, setting_batch = SETTINGS[setting]
  slots = max(1, len(labels) // batch_size)
  order = tta_streams.dirichlet_order(labels, dirichlet, seed, num_slots=slots) if dirichlet else None
  if builder == "mixed":  # one pass over the pool; batch size 1 over a slice of it
    n = len(images) if setting_batch is None else len(images) // 8
    return tta_streams.mixed(
        images[:n], labels[:n], corruptions.CORRUPTIONS, SEVERITY, batch_size=setting_batch or batch_size
    )
  return tta_streams.SETTINGS[builder](
      images, labels, corruptions.CORRUPTIONS, SEVERITY, batch_size=batch_size, seed=seed, order=order
  )


def run_experiment(
    workdir: str,
    *,
    pretrained: str = "",
    data_dir: str = "",
    num_images: int = 128,
    pretrain_steps: int = 500,
    batch_size: int = 64,
    methods: list[str] | tuple[str, ...] = (),
) -> dict:
  """Runs the experiment (module docstring); returns what it writes to tta.json."""
  methods = list(methods) or list(METHODS)
  for method in methods:
    runner.method_module(method)  # unknown names fail before any work
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  if not pretrained:
    pretrained = os.path.join(workdir, "fashion_resnet")
    if not os.path.exists(os.path.join(pretrained, "export", "model_state")):
      config = fashion_resnet.get_config()
      config.num_train_steps, config.progress_bar, config.dataset.data_dir = pretrain_steps, False, data_dir
      train_and_evaluate(config, pretrained)
  model_config, params, model_state = tta_loop.load_pretrained(pretrained)
  model = build_model(model_config)
  data_dir = input_pipeline.resolve_data_dir(data_dir)

  def split(name, count):
    source, _ = input_pipeline.get_data_source("jaxpeft_fashion_mnist", name, data_dir)
    batch = input_pipeline.fetch_batch(source, range(min(count, len(source))))
    return np.asarray(batch["image"], np.uint8), np.asarray(batch["label"])

  # The mixed settings draw from a pool as large as the other streams (num_images per corruption).
  pool_images, pool_labels = split("test", num_images * len(corruptions.CORRUPTIONS))
  images, labels = pool_images[:num_images], pool_labels[:num_images]
  clean_images, clean_labels = split("train", CLEAN_IMAGES)
  clean = [
      (
          clean_images[i : i + batch_size].astype(np.float32) / 255,
          clean_labels[i : i + batch_size].astype(np.int32),
      )
      for i in range(0, len(clean_images) - batch_size + 1, batch_size)
  ]

  errors, backward, refused, continual_records = {}, {}, {}, {}
  for method in methods:
    optimizer, options = method_setup(method)
    # One config per method: its jitted step compiles once and is reused across settings.
    config = runner.make_config(
        method,
        model.apply,
        model_config.num_classes,
        tta_loop.build_optimizer(optimizer) if optimizer else None,
        options,
    )
    for setting in SETTINGS:
      mixed = SETTINGS[setting][0] == "mixed"
      stream = _stream(setting, pool_images if mixed else images, pool_labels if mixed else labels, batch_size)
      try:
        records = runner.run(method, config, params, model_state, stream, clean)
      except ValueError as e:
        refused.setdefault(setting, {})[method] = str(e).split(";")[0]
        continue
      errors.setdefault(setting, {})[method] = runner.error_by_corruption(records)
      if setting == "one_at_a_time" and hasattr(config, "optimizer"):  # no optimizer: no backward pass
        # Images back-propagated: counted by methods that filter (EATA), else every image seen.
        backward[method] = sum(r.get("backward", r["count"]) for r in records)
      if setting == "continual":
        continual_records[method] = [r["error"] for r in records]
      print(f"{method:>10} {setting:>14}: {100 * errors[setting][method]['mean']:.1f}%", flush=True)
  means = {s: {m: e["mean"] for m, e in by_method.items()} for s, by_method in errors.items()}
  claims = check_claims(means, backward)
  result = {
      "errors": errors,
      "backward": backward,
      "refused": refused,
      "claims": claims,
      "continual_online_error": continual_records,
      "num_images": num_images,
      "wall_s": round(time.time() - start, 1),
  }
  with open(os.path.join(workdir, "tta.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, "tta.md"), "w", encoding="utf-8") as f:
    f.write(report(result, methods))
  _plot(continual_records, os.path.join(workdir, "tta_continual.png"), len(images) // batch_size)
  return result


def report(result: dict, methods: list[str]) -> str:
  """The markdown tables: per corruption (reset per corruption), per setting, the claims."""
  errors, names = result["errors"], list(corruptions.CORRUPTIONS) + ["mean"]
  reset = errors.get("one_at_a_time", {})
  lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  lines += [
      f"| {m} | " + " | ".join(f"{100 * reset[m][c]:.1f}" for c in names) + " |" for m in methods if m in reset
  ]
  lines += [
      "",
      "| method | " + " | ".join(SETTINGS) + " | images back-propagated |",
      "|---|" + "---:|" * (len(SETTINGS) + 1),
  ]
  for m in methods:
    cells = [f"{100 * errors[s][m]['mean']:.1f}" if m in errors.get(s, {}) else "refused" for s in SETTINGS]
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {result['backward'].get(m, '')} |")
  for setting, by_method in result["refused"].items():
    lines += ["", *[f"- {m} refused {setting}: {msg}." for m, msg in by_method.items()]]
  lines += ["", "| claim | holds | numbers |", "|---|---|---|"]
  verdict = {True: "yes", False: "**no**", None: "not run"}
  lines += [f"| {c} | {verdict[ok]} | {n} |" for c, ok, n in result["claims"]]
  return "\n".join(lines) + "\n"


def _plot(records: dict[str, list[float]], path: str, batches_per_corruption: int) -> None:
  plt.figure(figsize=(9, 3.5))
  for method, errors in records.items():
    plt.plot(100 * np.cumsum(errors) / np.arange(1, len(errors) + 1), label=method)
  for k in range(1, len(corruptions.CORRUPTIONS)):
    plt.axvline(k * batches_per_corruption - 0.5, color="0.85", lw=0.5)
  plt.xlabel(f"batch ({len(corruptions.CORRUPTIONS)} corruptions in sequence, severity {SEVERITY}, no reset)")
  plt.ylabel("running online error (%)")
  plt.legend(fontsize=7, ncol=2)
  plt.tight_layout()
  plt.savefig(path, dpi=100)
  plt.close()


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags, defined only when this module runs as a program.

  Defining them at import would clash with other experiments' `--workdir` when tests import this module
  beside them in one process.
  """
  return {
      "workdir": flags.DEFINE_string("workdir", "workdir/tta", "Where the pretrained model and the results go."),
      "pretrained": flags.DEFINE_string(
          "pretrained", "", "A finished launch/train.py run to adapt ('' pretrains one)."
      ),
      "data_dir": flags.DEFINE_string(
          "data_dir", "", "TFDS data dir ('' -> $JAXPEFT_DATA_DIR or ~/tensorflow_datasets)."
      ),
      "num_images": flags.DEFINE_integer("num_images", 128, "Test images per corruption."),
      "pretrain_steps": flags.DEFINE_integer("pretrain_steps", 500, "Pretraining steps of the ResNet."),
      "batch_size": flags.DEFINE_integer("batch_size", 64, "Test batch size (except the batch-size-1 setting)."),
      "methods": flags.DEFINE_list("methods", [], "Methods of jaxpeft.tta.METHODS to run (default: all)."),
  }


def main(argv, flag_holders: dict[str, flags.FlagHolder]):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = {name: holder.value for name, holder in flag_holders.items()}
  result = run_experiment(values.pop("workdir"), **values)
  print(report(result, values["methods"] or list(METHODS)))
  print(f"wall time {result['wall_s']} s")


if __name__ == "__main__":
  _FLAG_HOLDERS = define_flags()
  app.run(lambda argv: main(argv, _FLAG_HOLDERS))
