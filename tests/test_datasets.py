import gzip

import numpy as np
import pytest
import tensorflow_datasets as tfds

from learned_opt import tasks
from learned_opt.tasks import datasets


def _write_idx(path, array, dtype_code=0x08):
  header = bytes([0, 0, dtype_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_real_mnist_files(data_dir):
  images = datasets.read_idx(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz")
  labels = datasets.read_idx(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz")
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
  data = datasets.load_idx_images(data_dir / "mnist")
  # Only the t10k files are present: split 8000 / 2000, deterministically.
  assert data.train_x.shape == (8000, 28, 28, 1) and data.test_x.shape == (2000, 28, 28, 1)
  assert 0.1 < data.mean < 0.2 and 0.25 < data.std < 0.4


def test_idx_round_trip_and_train_files_preferred(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 30), ("t10k", 10)):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 4, 4)))
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
  data = datasets.load_idx_images(tmp_path)
  assert data.train_x.shape == (30, 4, 4, 1) and data.test_x.shape == (10, 4, 4, 1)


@pytest.mark.parametrize("content, message", [
    (b"\x08\x03\x00\x00", "magic bytes"),
    (bytes([0, 0, 0x42, 1, 0, 0, 0, 2, 1, 2]), "unknown IDX dtype"),
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]), "truncated or corrupt"),
    (b"", "empty file"),
])
def test_corrupt_idx_gives_clear_error(tmp_path, content, message):
  path = tmp_path / "bad-idx1-ubyte"
  path.write_bytes(content)
  with pytest.raises(datasets.DatasetError, match=message) as err:
    datasets.read_idx(path)
  assert str(path) in str(err.value)


def test_corrupt_gzip_gives_clear_error(tmp_path):
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  path.write_bytes(b"\x1f\x8b\x08\x00garbage")
  with pytest.raises(datasets.DatasetError, match="cannot read IDX file"):
    datasets.read_idx(path)


def test_wrong_data_path_gives_clear_error(tmp_path):
  with pytest.raises(datasets.DatasetNotFoundError, match="LOPT_DATA_DIR"):
    datasets.load_idx_images(tmp_path / "nowhere")
  with pytest.raises(datasets.DatasetNotFoundError, match="does not exist"):
    datasets.load_text_file(tmp_path / "missing.txt")
  # A named dataset with neither local files nor a prepared tfds copy: one clear error
  # saying how to provide it (never a silent switch to synthetic data).
  with pytest.raises(datasets.DatasetNotFoundError, match="tfds build mnist"):
    datasets.image_dataset.__wrapped__("mnist", str(tmp_path))


def test_unknown_names_give_clear_errors():
  with pytest.raises(KeyError, match="registered families: quadratic"):
    tasks.get_family("resnet_imagenet")
  with pytest.raises(KeyError, match="held-out suite has"):
    tasks.get_suite_task("nope")
  with pytest.raises(ValueError, match="unknown image dataset 'imagenet'"):
    datasets.image_dataset("imagenet")


@pytest.mark.slow
def test_tfds_images_through_data_source(tmp_path):
  with tfds.testing.mock_data(num_examples=24):
    data = datasets.load_tfds_images("cifar10", data_dir=str(tmp_path))
  assert data.train_x.shape == (24, 32, 32, 3) and data.num_classes == 10
  family = tasks.ConvNetFamily(data)
  task = family.task()
  import jax
  loss = task.loss(task.init(jax.random.key(0)), None, task.batch(jax.random.key(1)))
  assert np.isfinite(float(loss))


def test_tfds_text_through_data_source(tmp_path):
  with tfds.testing.mock_data(num_examples=200):
    data = datasets.load_tfds_text("tiny_shakespeare", data_dir=str(tmp_path))
  assert data.vocab_size > 1 and data.train_tokens.shape[0] > 1000 and data.test_tokens.shape[0] > 1000


def test_real_text_file(data_dir):
  data = datasets.load_text_file(data_dir / "tinyshakespeare" / "input.txt")
  assert data.vocab_size == 65
  assert data.train_tokens.shape[0] + data.test_tokens.shape[0] == 1115394


def test_synthetic_data_is_deterministic():
  a, b = datasets.synthetic_images(num_train=64, num_test=8), datasets.synthetic_images(num_train=64, num_test=8)
  np.testing.assert_array_equal(a.train_x, b.train_x)
  t = datasets.synthetic_text(length=5000)
  assert t.vocab_size == 32 and int(t.train_tokens.max()) < 32
