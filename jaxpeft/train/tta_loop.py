"""`adapt(config, workdir)`: test-time adaptation of a launch/train.py model over a corrupted stream.

The loop behind launch/adapt.py (configs/tta_*.py). Reads `<pretrained>/config.json` (the model),
`<pretrained>/export/params` and, for models with BatchNorm, `<pretrained>/export/model_state`;
builds the stream (`jaxpeft.data.tta_streams`) and the method (`jaxpeft.tta.runner`); writes
`<workdir>/metrics.jsonl` (one line per batch: corruption, severity, online error of the batch and the
running error), `<workdir>/results.json` (error per corruption and their mean) and shows a progress bar.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

import jaxpeft.optim
from jaxpeft.data import corruptions, input_pipeline, tta_streams
from jaxpeft.models.registry import build_model
from jaxpeft.tta import runner


def load_pretrained(workdir: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """`(model config, params, model_state)` of a launch/train.py run; errors say what is missing."""
  config_file, params_dir = os.path.join(workdir, "config.json"), os.path.join(workdir, "export", "params")
  if not (os.path.isfile(config_file) and os.path.isdir(params_dir)):
    raise ValueError(
        f"config.pretrained={workdir!r} is not a finished launch/train.py run (it needs config.json"
        " and export/params). Train one first, e.g. python -m launch.train "
        "--config=configs/fashion_resnet.py --workdir=DIR, and pass that DIR."
    )
  with open(config_file, encoding="utf-8") as f:
    model_config = ml_collections.ConfigDict(json.load(f)["model"])
  params = ocp.StandardCheckpointer().restore(os.path.abspath(params_dir))
  state_dir = os.path.join(workdir, "export", "model_state")
  model_state = ocp.StandardCheckpointer().restore(os.path.abspath(state_dir)) if os.path.isdir(state_dir) else {}
  return model_config, params, model_state


def check_model_state(model, example: np.ndarray, model_state: dict, pretrained: str) -> None:
  """A model with collections (BatchNorm) needs them from the checkpoint."""
  needed = set(jax.eval_shape(model.init, jax.random.key(0), example)) - {"params"}
  missing = needed - set(model_state)
  if missing:
    raise ValueError(
        f"The checkpoint in {pretrained} has no batch statistics ({sorted(missing)} missing from "
        "export/model_state), but its model has BatchNorm layers. Re-export it with a"
        " launch/train.py that saves export/model_state (any run after BatchNorm support), or train"
        " it again."
    )


def build_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation | None:
  """`config.optimizer`: '' keeps the method's default; else a jaxpeft or optax optimizer by name."""
  if not opt.name:
    return None
  factory = getattr(jaxpeft.optim, opt.name, None) or getattr(optax, opt.name, None)
  if factory is None:
    raise ValueError(f"Unknown optimizer {opt.name!r}: use a jaxpeft.optim or optax name (sgd, adam, ...).")
  kwargs = {k: v for k, v in opt.items() if k != "name" and v is not None}
  return factory(**kwargs)


def make_stream(config: ml_collections.ConfigDict, images: np.ndarray, labels: np.ndarray):
  s = config.stream
  if s.setting not in tta_streams.SETTINGS:
    raise ValueError(f"config.stream.setting={s.setting!r}: use one of {sorted(tta_streams.SETTINGS)}.")
  order = tta_streams.dirichlet_order(labels, s.dirichlet, s.seed) if s.dirichlet else None
  kwargs = dict(batch_size=s.batch_size, seed=s.seed, order=order)
  if s.setting == "gradual":
    return tta_streams.gradual(images, labels, list(s.corruptions), **kwargs)
  return tta_streams.SETTINGS[s.setting](images, labels, list(s.corruptions), s.severity, **kwargs)


def _images(config, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  data_dir = input_pipeline.resolve_data_dir(config.dataset.data_dir)
  source, _ = input_pipeline.get_data_source(config.dataset.name, split, data_dir)
  batch = input_pipeline.fetch_batch(source, range(min(count or len(source), len(source))))
  return np.asarray(batch["image"], np.uint8), np.asarray(batch["label"])


def adapt(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config` (see the module docstring); returns `{"errors": ..., "records": ...}`."""
  model_config, params, model_state = load_pretrained(config.pretrained)
  model = build_model(model_config)
  images, labels = _images(config, config.dataset.split, config.dataset.num_images)
  check_model_state(model, images[:1].astype(np.float32) / 255, model_state, config.pretrained)
  for name in config.stream.corruptions:  # Fail before any work on a bad name.
    corruptions.check_corruption(name, config.stream.severity)
  method_config = runner.make_config(
      config.method, model.apply, model_config.num_classes, build_optimizer(config.optimizer), dict(config.options)
  )
  clean, clean_labels = [], []
  if config.clean_images:
    clean_images, clean_label_array = _images(config, config.dataset.clean_split, config.clean_images)
    b = config.stream.batch_size
    starts = range(0, len(clean_images) - b + 1, b)
    clean = [clean_images[i : i + b].astype(np.float32) / 255 for i in starts]
    clean_labels = [clean_label_array[i : i + b] for i in starts]
  os.makedirs(workdir, exist_ok=True)
  stream = make_stream(config, images, labels)
  per_setting = len(images) // config.stream.batch_size
  total = per_setting * len(config.stream.corruptions) * (9 if config.stream.setting == "gradual" else 1)
  if config.stream.setting == "mixed":
    total = per_setting
  wrong = seen = 0
  with (
      open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as log,
      tqdm.tqdm(total=total, unit="batch", disable=not config.progress_bar, dynamic_ncols=True) as bar,
  ):

    def on_batch(record):
      nonlocal wrong, seen
      wrong, seen = wrong + record["error"] * record["count"], seen + record["count"]
      log.write(json.dumps({**record, "running_error": wrong / seen}) + "\n")
      bar.update(1)
      bar.set_postfix(corruption=record["corruption"], error=f"{wrong / seen:.3f}")

    records = runner.run(config.method, method_config, params, model_state, stream, clean, on_batch, clean_labels)
  errors = runner.error_by_corruption(records)
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"method": config.method, "setting": config.stream.setting, "errors": errors}, f, indent=2)
  return {"errors": errors, "records": records}
