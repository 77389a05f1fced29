"""Fashion-MNIST as a TFDS dataset (`jaxpeft_fashion_mnist`), offline from Debian's package.

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747): 70,000 grey-scale 28x28 images of
Zalando articles in 10 classes (t-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker,
bag, ankle boot); 60,000 `train` and 10,000 `test` (TFDS stores them in its own shuffled order; `index` is the
position in the idx file).

Where the data comes from, first found wins:

1. the idx files (`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`) in `$FASHION_MNIST_DIR`, else in
   `/usr/share/datasets/fashion-mnist`, where Debian's `dataset-fashion-mnist` package puts them
   (`apt-get install dataset-fashion-mnist`; `make install-test` does it where apt-get exists);
2. TFDS' own `fashion_mnist` builder, which downloads (needs a network once).

Features: `image` uint8 (28, 28, 1) in 0..255, `label` ClassLabel(10), `index` int32 (position in
the split's idx file). Preprocess: `jaxpeft.data.input_pipeline.uint8_image_preprocess`.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)


def read_idx(path: str) -> np.ndarray:
  """The array in a (gzipped) idx file: big-endian magic `0 0 dtype ndim`, ndim uint32 sizes, data."""
  with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
    data = f.read()
  if data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte idx file (magic {data[:4]!r}).")
  ndim = data[3]
  shape = tuple(int(s) for s in np.frombuffer(data, ">u4", ndim, offset=4))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def local_dir() -> str | None:
  """The folder holding the four idx files ($FASHION_MNIST_DIR, then Debian's), or None."""
  for folder in (os.environ.get("FASHION_MNIST_DIR", ""), DEBIAN_DIR):
    if folder and all(os.path.exists(os.path.join(folder, f)) for pair in _FILES.values() for f in pair):
      return folder
  return None


def load_split(split: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
  """`(images (n, 28, 28, 1) uint8, labels (n,) uint8)` of `split` from the idx files in `folder`."""
  images_file, labels_file = _FILES[split]
  images, labels = read_idx(os.path.join(folder, images_file)), read_idx(os.path.join(folder, labels_file))
  if images.shape[1:] != IMAGE_SHAPE[:2] or len(images) != len(labels):
    raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not fit.")
  return images[..., None], labels


class FashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local idx files, or from TFDS' download (see the module docstring)."""

  name = "jaxpeft_fashion_mnist"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The original train/test split, in idx file order."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST: 28x28 grey-scale images of 10 kinds of clothing.",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "index": tfds.features.Scalar(dtype=np.int32, doc="Position in the split's idx file."),
            }
        ),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation=(
            "@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for Benchmarking "
            "Machine Learning Algorithms}, author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland}, "
            "journal={arXiv:1708.07747}, year={2017}}"
        ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    folder = local_dir()
    if folder is not None:
      return {split: self._generate_examples(*load_split(split, folder)) for split in _FILES}
    catalog = tfds.builder("fashion_mnist", data_dir=os.fspath(self.data_dir_root), file_format="array_record")
    try:
      catalog.download_and_prepare(file_format="array_record")
    except Exception as e:  # Offline, no local files: say how to get them.
      raise RuntimeError(
          f"Fashion-MNIST: no idx files in $FASHION_MNIST_DIR or {DEBIAN_DIR}, and TFDS' fashion_mnist could not"
          f" be downloaded ({type(e).__name__}). Install them with `apt-get install dataset-fashion-mnist`,"
          " or point $FASHION_MNIST_DIR at a folder with the four idx .gz files."
      ) from e
    return {split: self._copy(catalog.as_data_source(split=split)) for split in _FILES}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for i in range(len(labels)):
      yield i, {"image": images[i], "label": int(labels[i]), "index": i}

  def _copy(self, source):
    for i in range(len(source)):
      yield i, {"image": np.asarray(source[i]["image"], np.uint8), "label": int(source[i]["label"]), "index": i}
