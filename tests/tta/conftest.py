"""Fixtures for the TTA tests: a small prepared Fashion-MNIST and a pretrained tiny ResNet run."""

import gzip
import os
import struct

import numpy as np
import pytest

from configs import fashion_resnet
from jaxpeft.data import fashion_mnist, input_pipeline
from jaxpeft.train.loop import train_and_evaluate

TRAIN, TEST = 384, 96


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.asarray(array, np.uint8).tobytes())


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory):
  """A data dir with `jaxpeft_fashion_mnist` prepared from the first images of each split.

  The images are the real ones when Debian's package is installed, else random ones (same shapes).
  """
  idx_dir = tmp_path_factory.mktemp("fashion_idx")
  rng = np.random.default_rng(0)
  for split, n in (("train", TRAIN), ("test", TEST)):
    if fashion_mnist.local_dir():
      images, labels = fashion_mnist.load_split(split, fashion_mnist.local_dir())
      images, labels = images[:n, ..., 0], labels[:n]
    else:
      images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    images_file, labels_file = fashion_mnist._FILES[split]
    _write_idx(str(idx_dir / images_file), images)
    _write_idx(str(idx_dir / labels_file), labels)
  data_dir = str(tmp_path_factory.mktemp("fashion_tfds"))
  previous = os.environ.get("FASHION_MNIST_DIR")
  os.environ["FASHION_MNIST_DIR"] = str(idx_dir)
  try:
    input_pipeline.get_data_source("jaxpeft_fashion_mnist", "test", data_dir)
  finally:
    if previous is None:
      del os.environ["FASHION_MNIST_DIR"]
    else:
      os.environ["FASHION_MNIST_DIR"] = previous
  return data_dir


@pytest.fixture(scope="session")
def pretrained_run(fashion_data_dir, tmp_path_factory):
  """`(workdir, result)` of the fashion_resnet smoke run (a tiny BN ResNet, a few steps)."""
  config = fashion_resnet.get_config("smoke")
  config.dataset.data_dir = fashion_data_dir
  config.checkpoint.async_save = False
  workdir = str(tmp_path_factory.mktemp("fashion_resnet"))
  return workdir, train_and_evaluate(config, workdir)
