"""`config.dataset.label_noise` in the training loop: after class selection, training split only."""

import numpy as np

from jaxpeft.data import input_pipeline
from jaxpeft.train import loop

CLASSES, NOISE = (5, 6, 7, 8, 9), 0.4


def _labels(source):
  return np.array([int(source[i]["label"]) for i in range(len(source))])


def test_label_noise_flips_training_labels_among_the_selected_classes(smoke_config, tmp_path, monkeypatch):
  trained, evaluated = [], []

  class RecordingLoader(input_pipeline.BatchLoader):

    def __init__(self, source, **kwargs):
      trained.append(source)
      super().__init__(source, **kwargs)

  eval_batches = input_pipeline.eval_batches

  def recording_eval_batches(source, **kwargs):
    evaluated.append(source)
    return eval_batches(source, **kwargs)

  monkeypatch.setattr(loop.input_pipeline, "BatchLoader", RecordingLoader)
  monkeypatch.setattr(loop.input_pipeline, "eval_batches", recording_eval_batches)
  config = smoke_config(
      dataset__classes=CLASSES, dataset__label_noise=NOISE, model__num_classes=len(CLASSES), num_train_steps=2
  )
  loop.train_and_evaluate(config, str(tmp_path))

  data_dir = input_pipeline.resolve_data_dir(config.dataset.data_dir)
  clean = {
      split: _labels(
          input_pipeline.select_classes(
              input_pipeline.get_data_source(config.dataset.name, split, data_dir)[0], config.dataset
          )
      )
      for split in (config.dataset.train_split, config.dataset.eval_split)
  }
  noisy = _labels(trained[0])
  assert len(noisy) == len(clean[config.dataset.train_split]) and set(noisy) <= set(range(len(CLASSES)))
  flipped = noisy != clean[config.dataset.train_split]
  assert flipped.sum() == round(NOISE * len(noisy))
  assert len(set(noisy[flipped])) == len(CLASSES)  # flips land on every selected class
  np.testing.assert_array_equal(_labels(evaluated[0]), clean[config.dataset.eval_split])
