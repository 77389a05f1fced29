r"""Test-time adaptation results on corrupted Fashion-MNIST: error per corruption and method, claims.

  python -m experiments.tta --workdir=workdir/tta [--num_images=1000] [--pretrain_steps=2000]

1. Pretrains `configs/fashion_resnet.py` (the BatchNorm ResNet) on clean Fashion-MNIST train.
2. On the first `--num_images` test images, every corruption at severity 5, batches of 64, runs each
   method one corruption at a time (reset before each); Tent and CoTTA also in the continual setting;
   source, BN-adapt and LAME also with Dirichlet(0.1)-ordered labels (non-i.i.d.).
3. Writes `<workdir>/tta.md` (the tables and the claims) and `<workdir>/tta_continual.png` (online
   error along the continual stream), and checks the papers' claims in code (`check_claims`).
"""

import json
import os

import matplotlib
import ml_collections
import numpy as np
from absl import app, flags

from configs import fashion_resnet, tta_sar
from jaxpeft.data import corruptions, input_pipeline, tta_streams
from jaxpeft.models.registry import build_model
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.tta import runner
from experiments.claims.tta import check_claims
from jaxpeft.train import tta_loop

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", "workdir/tta", "Where the pretrained model and the results go.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1000, "Test images per corruption.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 2000, "Pretraining steps of the ResNet.")
_BATCH = 64

METHOD_OPTIONS = {  # (optimizer, options): the configs/tta_*.py defaults
    "source": (None, {}),
    "bn_adapt": (None, {}),
    "tent": ({"name": "adam", "learning_rate": 1e-3}, {}),
    "eata": ({"name": "sgd", "learning_rate": 0.00025, "momentum": 0.9}, {}),
    "sar": ({"name": "sgd", "learning_rate": 0.00025, "momentum": 0.9}, {"pattern": tta_sar.PATTERN}),
    "lame": (None, {}),
    "cotta": ({"name": "adam", "learning_rate": 1e-3}, {}),
}


def _run(method, setting, params, model_state, model, images, labels, clean, dirichlet=0.0):
  optimizer, options = METHOD_OPTIONS[method]
  opt_config = ml_collections.ConfigDict(optimizer or {"name": ""})
  config = runner.make_config(method, model.apply, 10, tta_loop.build_optimizer(opt_config), options)
  order = tta_streams.dirichlet_order(labels, dirichlet, 0) if dirichlet else None
  stream = tta_streams.SETTINGS[setting](
      images, labels, corruptions.CORRUPTIONS, 5, batch_size=_BATCH, order=order
  )
  return runner.run(method, config, params, model_state, stream, clean if method == "eata" else ())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  pretrain_dir = os.path.join(workdir, "fashion_resnet")
  config = fashion_resnet.get_config()
  config.num_train_steps = _PRETRAIN_STEPS.value
  config.progress_bar = False
  if not os.path.exists(os.path.join(pretrain_dir, "export", "model_state")):
    train_and_evaluate(config, pretrain_dir)
  model_config, params, model_state = tta_loop.load_pretrained(pretrain_dir)
  model = build_model(model_config)
  data_dir = input_pipeline.resolve_data_dir("")
  test, _ = input_pipeline.get_data_source("jaxpeft_fashion_mnist", "test", data_dir)
  batch = input_pipeline.fetch_batch(test, range(_NUM_IMAGES.value))
  images, labels = np.asarray(batch["image"], np.uint8), np.asarray(batch["label"])
  train, _ = input_pipeline.get_data_source("jaxpeft_fashion_mnist", "train", data_dir)
  clean_uint8 = input_pipeline.fetch_batch(train, range(512))["image"]
  clean = [np.asarray(clean_uint8[i : i + _BATCH], np.float32) / 255 for i in range(0, 512, _BATCH)]

  table, backward, records = {}, {}, {}
  for method in METHOD_OPTIONS:
    recs = _run(method, "one_at_a_time", params, model_state, model, images, labels, clean)
    table[method] = runner.error_by_corruption(recs)
    backward[method] = sum(r.get("backward", r["count"]) for r in recs)
    print(method, f"{100 * table[method]['mean']:.1f}%", flush=True)
  continual = {}
  for method in ("tent", "cotta"):
    records[method] = _run(method, "continual", params, model_state, model, images, labels, clean)
    continual[method] = runner.error_by_corruption(records[method])["mean"]
  non_iid = {}
  for method in ("source", "bn_adapt", "lame"):
    recs = _run(method, "one_at_a_time", params, model_state, model, images, labels, clean, dirichlet=0.1)
    non_iid[method] = runner.error_by_corruption(recs)["mean"]
  claims = check_claims(table, backward, continual, non_iid)

  names = list(corruptions.CORRUPTIONS) + ["mean"]
  lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  lines += [f"| {m} | " + " | ".join(f"{100 * table[m][c]:.1f}" for c in names) + " |" for m in table]
  lines += [
      "",
      "| setting | " + " | ".join(continual) + " |",
      "|---|" + "---:|" * len(continual),
      "| continual (mean error %) | " + " | ".join(f"{100 * v:.1f}" for v in continual.values()) + " |",
      "",
      "| Dirichlet(0.1) labels | " + " | ".join(non_iid) + " |",
      "|---|" + "---:|" * len(non_iid),
      "| mean error % | " + " | ".join(f"{100 * v:.1f}" for v in non_iid.values()) + " |",
      "",
      "| claim | holds | numbers |",
      "|---|---|---|",
  ]
  lines += [f"| {c} | {'yes' if ok else '**no**'} | {n} |" for c, ok, n in claims]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "tta.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "tta.json"), "w", encoding="utf-8") as f:
    json.dump(
        {"table": table, "backward": backward, "continual": continual, "non_iid": non_iid, "claims": claims},
        f,
        indent=2,
    )
  plt.figure(figsize=(8, 3))
  for method, recs in records.items():
    plt.plot(np.cumsum([r["error"] for r in recs]) / np.arange(1, len(recs) + 1), label=method)
  plt.xlabel("batch (12 corruptions in sequence, severity 5)")
  plt.ylabel("running online error")
  plt.legend()
  plt.tight_layout()
  plt.savefig(os.path.join(workdir, "tta_continual.png"), dpi=100)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
