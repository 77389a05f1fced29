"""The scikit-learn handwritten digits as a TFDS dataset (`jaxpeft_digits`), usable offline.

The data is `sklearn.datasets.load_digits()`: 1797 grey-scale 8x8 images of the digits 0-9, each
pixel an integer count in 0..16 (the UCI "Optical Recognition of Handwritten Digits" test set,
Alpaydin & Kaynak, 1998). It ships inside scikit-learn, so preparing it needs no network; this
makes it the embedded default dataset of the harness.

Splits (fixed, stratified by label: `sklearn.model_selection.train_test_split` with
`test_size=0.2`, `random_state=0`; every class keeps its share to within one example):

=====  ========  =====================================================================
split  examples  examples per label 0..9
=====  ========  =====================================================================
train  1437      142 146 142 146 145 145 145 143 139 144
test   360        36  36  35  37  36  37  36  36  35  36
=====  ========  =====================================================================

Features:

* `image`: uint8 tensor of shape (8, 8, 1), values 0..16 as shipped (not rescaled; see
  `jaxpeft.data.input_pipeline.digits_preprocess`).
* `label`: `ClassLabel(num_classes=10)`, the digit.
* `index`: int32, the row of the example in `load_digits()`, so every stored example can be
  traced back to its source.

The builder only writes `array_record` (or `parquet`): TFDS' `tfrecord` writer needs TensorFlow,
which this project does not install. Prepare it with
`Digits(data_dir=...).download_and_prepare(file_format="array_record")`, or through
`jaxpeft.data.input_pipeline.get_data_source("jaxpeft_digits", split, data_dir)`.
"""

import numpy as np
import sklearn.datasets
import sklearn.model_selection
import tensorflow_datasets as tfds

NUM_CLASSES = 10
MAX_PIXEL = 16
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
  """The sorted `load_digits()` row indices of each split (see the module docstring)."""
  target = sklearn.datasets.load_digits().target
  train, test = sklearn.model_selection.train_test_split(
      np.arange(len(target)),
      test_size=TEST_FRACTION,
      random_state=SPLIT_SEED,
      stratify=target,
  )
  return {"train": np.sort(train), "test": np.sort(test)}


class Digits(tfds.core.GeneratorBasedBuilder):
  """`sklearn.datasets.load_digits()` as a TFDS builder (see the module docstring)."""

  name = "jaxpeft_digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 train/test split of load_digits(), seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "scikit-learn's copy of the UCI optical recognition of handwritten digits test "
            "set: 8x8 images with pixel counts 0..16, digits 0-9."
        ),
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "index": tfds.features.Scalar(
                    dtype=np.int32, doc="Row of the example in sklearn.datasets.load_digits()."
                ),
            }
        ),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
        citation=(
            "@misc{alpaydin1998digits, author={Alpaydin, E. and Kaynak, C.}, "
            "title={Optical Recognition of Handwritten Digits}, year={1998}, "
            "howpublished={UCI Machine Learning Repository}, doi={10.24432/C50P49}}"
        ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn.
    return {split: self._generate_examples(indices) for split, indices in split_indices().items()}

  def _generate_examples(self, indices: np.ndarray):
    digits = sklearn.datasets.load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    for i in indices:
      yield int(i), {"image": images[i], "label": int(digits.target[i]), "index": int(i)}
