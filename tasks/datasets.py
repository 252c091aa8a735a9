"""Datasets as in-memory arrays: tfds, local files (IDX, plain text) and synthetic.

Every loader returns a frozen pytree (`ImageData` or `TextData`) whose arrays live on
the device, so task families sample minibatches inside jit with no Python data loader
in the inner loop. Images are stored as uint8 and scaled when a batch is drawn.

Where data comes from, for a named dataset (`mnist`, `fashion_mnist`, `cifar10`,
`tiny_shakespeare`):
  1. the local files under `data_dir` (argument, else the env var `LOPT_DATA_DIR`):
     `<data_dir>/<name>/*-idx?-ubyte[.gz]` for the MNIST-format sets,
     `<data_dir>/tinyshakespeare/input.txt` for tiny shakespeare;
  2. else tensorflow-datasets' prepared copy (`tfds.data_source`, read without
     TensorFlow; `TFDS_DATA_DIR` or `~/tensorflow_datasets`), never downloaded here.
If neither has it, `DatasetNotFoundError` says how to provide it; lopt never swaps in
other data silently.
"""
from __future__ import annotations

import functools
import gzip
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DATA_DIR_ENV = "LOPT_DATA_DIR"


class DatasetError(ValueError):
  """A dataset file exists but is malformed."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not available locally; the message says how to provide it."""


class ImageData(struct.PyTreeNode):
  """Images [N, H, W, C] uint8 and integer labels [N], train and test splits."""
  train_x: jnp.ndarray
  train_y: jnp.ndarray
  test_x: jnp.ndarray
  test_y: jnp.ndarray
  name: str = struct.field(pytree_node=False)
  num_classes: int = struct.field(pytree_node=False)
  mean: float = struct.field(pytree_node=False, default=0.5)
  std: float = struct.field(pytree_node=False, default=0.5)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_x.shape[1:])


class TextData(struct.PyTreeNode):
  """Token ids [N] (int32) of one long text, train and test splits."""
  train_tokens: jnp.ndarray
  test_tokens: jnp.ndarray
  name: str = struct.field(pytree_node=False)
  vocab: str = struct.field(pytree_node=False)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)


def _images(name, train_x, train_y, test_x, test_y, num_classes) -> ImageData:
  if train_x.ndim == 3:
    train_x, test_x = train_x[..., None], test_x[..., None]
  scaled = train_x.astype(np.float32) / 255.0
  return ImageData(jnp.asarray(train_x, jnp.uint8), jnp.asarray(train_y, jnp.int32),
                   jnp.asarray(test_x, jnp.uint8), jnp.asarray(test_y, jnp.int32),
                   name=name, num_classes=int(num_classes),
                   mean=float(scaled.mean()), std=float(scaled.std() + 1e-8))


# ---------------------------------------------------------------- local files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzip-compressed or not.

  Raises:
    DatasetError: the file is not a valid IDX file (bad magic, dtype or size).
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip raises these for truncated/corrupt files
    raise DatasetError(f"cannot read IDX file {path}: {e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DatasetError(f"{path} is not an IDX file: expected magic bytes 00 00 <dtype> <ndim>, "
                       f"got {raw[:4].hex(' ') or 'an empty file'}")
  dtype, ndim = _IDX_DTYPES.get(raw[2]), raw[3]
  if dtype is None:
    raise DatasetError(f"{path}: unknown IDX dtype code 0x{raw[2]:02x}; expected one of "
                       f"{sorted(hex(k) for k in _IDX_DTYPES)}")
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise DatasetError(f"{path}: IDX header declares {ndim} dimensions but the file is "
                       f"{len(raw)} bytes long")
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
  expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
  if len(raw) - header != expected:
    raise DatasetError(f"{path}: IDX header declares shape {shape} ({expected} bytes of data) "
                       f"but the file holds {len(raw) - header} bytes; the file is truncated "
                       f"or corrupt")
  return np.frombuffer(raw[header:], dtype=dtype).reshape(shape)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
  for candidate in (directory / stem, directory / f"{stem}.gz"):
    if candidate.exists():
      return candidate
  return None


def load_idx_images(directory: str | os.PathLike, *, name: str = "mnist",
                    num_classes: int = 10, test_fraction: float = 0.2) -> ImageData:
  """Loads an MNIST-format dataset from `directory`.

  Looks for `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
  `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`. If only the t10k
  (test) files are present, they are split deterministically: the first
  `1 - test_fraction` of the examples train, the rest test.
  """
  directory = pathlib.Path(directory)
  files = {k: _find(directory, f"{k}-idx{3 if 'images' in k else 1}-ubyte")
           for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
  if files["t10k-images"] is None or files["t10k-labels"] is None:
    raise DatasetNotFoundError(
        f"no MNIST-format files for {name!r} in {directory}: expected "
        f"t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (and optionally the "
        f"train-* pair). Put them there or pass another data_dir / set ${DATA_DIR_ENV}.")
  test_x, test_y = read_idx(files["t10k-images"]), read_idx(files["t10k-labels"])
  if files["train-images"] is not None and files["train-labels"] is not None:
    train_x, train_y = read_idx(files["train-images"]), read_idx(files["train-labels"])
  else:
    cut = int(round(len(test_x) * (1.0 - test_fraction)))
    train_x, train_y, test_x, test_y = test_x[:cut], test_y[:cut], test_x[cut:], test_y[cut:]
  for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise DatasetError(f"{directory}: {split} images have shape {x.shape} and labels "
                         f"{y.shape}; expected [N, H, W] and [N] with the same N")
  return _images(name, train_x, train_y, test_x, test_y, num_classes)


def load_text_file(path: str | os.PathLike, *, name: str | None = None,
                   test_fraction: float = 0.1) -> TextData:
  """Loads a plain-text file as characters; the last `test_fraction` is the test split."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DatasetNotFoundError(f"text file {path} does not exist")
  text = path.read_text(encoding="utf-8")
  return text_data(text, name=name or path.stem, test_fraction=test_fraction)


def text_data(text: str, *, name: str, test_fraction: float = 0.1) -> TextData:
  if len(text) < 1000:
    raise DatasetError(f"text {name!r} has {len(text)} characters; need at least 1000")
  vocab = "".join(sorted(set(text)))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
  cut = int(len(ids) * (1.0 - test_fraction))
  return TextData(jnp.asarray(ids[:cut]), jnp.asarray(ids[cut:]), name=name, vocab=vocab)


# ---------------------------------------------------------------- tfds


def _tfds_source(name: str, split: str, data_dir: str | None):
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # tfds is optional on accelerator images
    raise DatasetNotFoundError(f"dataset {name!r} needs tensorflow-datasets (pip install "
                               f"'lopt[tfds]') or local files under ${DATA_DIR_ENV}") from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for "not prepared"
    raise DatasetNotFoundError(
        f"dataset {name!r} is not available: no local files under ${DATA_DIR_ENV} and no "
        f"prepared tfds copy (data_dir={data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'}). "
        f"Provide it with `tfds build {name}` on a machine with internet (then copy the "
        f"directory), or put the files in <data_dir>/{name}/ (see lopt.tasks.datasets). "
        f"tfds said: {type(e).__name__}: {str(e)[:200]}") from e


def _read_all(source) -> list:
  # Item by item: tfds' mocked sources do not implement the batched __getitems__.
  return [source[i] for i in range(len(source))]


def load_tfds_images(name: str, *, data_dir: str | None = None) -> ImageData:
  """Reads an image-classification dataset from tfds (array_record; no TensorFlow)."""
  arrays = {}
  for split in ("train", "test"):
    source = _tfds_source(name, split, data_dir)
    examples = _read_all(source)
    arrays[split] = (np.stack([np.asarray(e["image"]) for e in examples]),
                     np.asarray([int(e["label"]) for e in examples]))
    num_classes = source.dataset_info.features["label"].num_classes
  return _images(name, *arrays["train"], *arrays["test"], num_classes)


def load_tfds_text(name: str = "tiny_shakespeare", *, data_dir: str | None = None) -> TextData:
  """Reads a text dataset whose examples carry a `text` feature (tiny_shakespeare)."""
  parts = {}
  for split in ("train", "test"):
    source = _tfds_source(name, split, data_dir)
    texts = [e["text"] for e in _read_all(source)]
    parts[split] = "".join(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)
  text = parts["train"] + parts["test"]
  return text_data(text, name=name, test_fraction=len(parts["test"]) / max(len(text), 1))


# ---------------------------------------------------------------- synthetic


def synthetic_images(*, num_classes: int = 10, image_shape=(16, 16, 1), num_train: int = 4096,
                     num_test: int = 1024, class_separation: float = 0.3, seed: int = 0) -> ImageData:
  """Smooth random images around class prototypes, quantized to uint8; fully offline.

  Each image is a shared smooth background pattern of its own (random per image) plus
  its class's smooth prototype scaled by `class_separation`, plus pixel noise; the small
  separation keeps the problem learnable but not trivially separable.
  """
  rng = np.random.default_rng(seed)
  h, w, c = image_shape
  smooth = lambda a: np.repeat(np.repeat(a, 4, axis=1), 4, axis=2)[:, :h, :w, :]
  coarse_shape = ((h + 3) // 4, (w + 3) // 4, c)
  protos = smooth(rng.normal(size=(num_classes,) + coarse_shape))
  n = num_train + num_test
  labels = rng.integers(0, num_classes, size=n)
  background = smooth(rng.normal(size=(n,) + coarse_shape))
  x = class_separation * protos[labels] + 0.5 * background + 0.5 * rng.normal(size=(n, h, w, c))
  x = np.clip(128 + 60 * x, 0, 255).astype(np.uint8)
  name = f"synthetic_images_{h}x{w}x{c}" + ("" if class_separation == 0.3 else f"_sep{class_separation:g}")
  return _images(name, x[:num_train], labels[:num_train],
                 x[num_train:], labels[num_train:], num_classes)


def downsample(data: ImageData, size: int) -> ImageData:
  """`data` resized to `size` x `size` pixels (antialiased bilinear), still uint8.

  Celo2's meta-training tasks are MLPs on 8x8-downsampled MNIST-like images: an input
  of 64 features keeps a 64-32-10 MLP at ~5k parameters.
  """
  if size < 1 or size > min(data.image_shape[:2]):
    raise ValueError(f"downsample size must be in [1, {min(data.image_shape[:2])}] for "
                     f"{data.name!r} images of shape {data.image_shape}; got {size}")

  def resize(x):
    shape = (x.shape[0], size, size, x.shape[-1])
    out = jax.image.resize(jnp.asarray(x, jnp.float32), shape, method="linear", antialias=True)
    return np.asarray(jnp.clip(jnp.round(out), 0, 255)).astype(np.uint8)

  return _images(f"{data.name}_{size}x{size}", resize(data.train_x), np.asarray(data.train_y),
                 resize(data.test_x), np.asarray(data.test_y), data.num_classes)


def synthetic_text(*, vocab_size: int = 32, length: int = 200_000, branching: int = 3,
                   seed: int = 0) -> TextData:
  """A random second-order Markov chain over `vocab_size` symbols.

  Each context of two symbols allows `branching` next symbols, so a good model's
  loss approaches log(branching) nats, well below the unigram entropy.
  """
  rng = np.random.default_rng(seed)
  nxt = rng.integers(0, vocab_size, size=(vocab_size, vocab_size, branching))
  probs = rng.dirichlet(np.ones(branching), size=(vocab_size, vocab_size))
  ids = np.empty(length, dtype=np.int32)
  ids[:2] = rng.integers(0, vocab_size, size=2)
  u = rng.random(length)
  for t in range(2, length):  # one-off generation at load time, not in the inner loop
    p = probs[ids[t - 2], ids[t - 1]]
    ids[t] = nxt[ids[t - 2], ids[t - 1], min(int(np.searchsorted(np.cumsum(p), u[t])), branching - 1)]
  vocab = "".join(chr(ord("a") + i) if i < 26 else chr(ord("0") + i - 26) for i in range(vocab_size))
  cut = int(length * 0.9)
  return TextData(jnp.asarray(ids[:cut]), jnp.asarray(ids[cut:]), name=f"synthetic_text_{vocab_size}",
                  vocab=vocab)


# ---------------------------------------------------------------- named datasets

IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")
TEXT_DATASETS = ("tiny_shakespeare", "synthetic")
_LOCAL_DIRS = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "tiny_shakespeare": "tinyshakespeare"}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
  return pathlib.Path(data_dir).expanduser() if data_dir else None


@functools.lru_cache(maxsize=16)
def image_dataset(name: str, data_dir: str | None = None) -> ImageData:
  """A named image dataset; see the module docstring for where it is read from."""
  if name not in IMAGE_DATASETS:
    raise ValueError(f"unknown image dataset {name!r}; expected one of {IMAGE_DATASETS}")
  if name == "synthetic":
    return synthetic_images()
  root = resolve_data_dir(data_dir)
  local = root / _LOCAL_DIRS[name] if root is not None and name in _LOCAL_DIRS else None
  if local is not None and local.is_dir():
    return load_idx_images(local, name=name)
  return load_tfds_images(name, data_dir=None if root is None else str(root))


@functools.lru_cache(maxsize=16)
def text_dataset(name: str, data_dir: str | None = None) -> TextData:
  """A named text dataset; see the module docstring for where it is read from."""
  if name not in TEXT_DATASETS:
    raise ValueError(f"unknown text dataset {name!r}; expected one of {TEXT_DATASETS}")
  if name == "synthetic":
    return synthetic_text()
  root = resolve_data_dir(data_dir)
  if root is not None and (root / _LOCAL_DIRS[name] / "input.txt").is_file():
    return load_text_file(root / _LOCAL_DIRS[name] / "input.txt", name=name)
  return load_tfds_text(name, data_dir=None if root is None else str(root))
