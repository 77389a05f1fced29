"""Fashion-MNIST builder: idx parsing (hand-written files) and a full prepare from a tiny idx folder."""

import gzip
import os
import struct

import numpy as np
import pytest

from jaxpeft.data import fashion_mnist, input_pipeline


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, (images_file, labels_file) in fashion_mnist._FILES.items():
    n = 12 if split == "train" else 5
    arrays[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
    _write_idx(str(tmp_path / images_file), arrays[split][0])
    _write_idx(str(tmp_path / labels_file), arrays[split][1])
  monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
  return arrays


def test_read_idx_and_prepare_from_local_folder(tiny_folder, tmp_path):
  images, labels = tiny_folder["test"]
  np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz")), images)
  source, info = input_pipeline.get_data_source("jaxpeft_fashion_mnist", "test", str(tmp_path / "data"))
  assert info.splits["train"].num_examples == 12 and len(source) == 5
  for i in range(5):
    example = source[i]
    np.testing.assert_array_equal(example["image"][..., 0], images[example["index"]])
    assert example["label"] == labels[example["index"]]
  batch = input_pipeline.get_preprocess("jaxpeft_fashion_mnist")(input_pipeline.fetch_batch(source, [0, 1]))
  assert batch["image"].dtype == np.float32 and batch["image"].max() <= 1.0


def test_not_an_idx_file(tmp_path):
  path = str(tmp_path / "bad.gz")
  with gzip.open(path, "wb") as f:
    f.write(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
    fashion_mnist.read_idx(path)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_files_have_the_published_sizes():
  images, labels = fashion_mnist.load_split("test", fashion_mnist.DEBIAN_DIR)
  assert images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)  # Balanced test set (Xiao et al. 2017).
