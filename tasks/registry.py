"""Named task families: `META_TRAIN_FAMILIES` and `REAL_DATA_FAMILIES`.

`META_TRAIN_FAMILIES` are offline (synthetic or quadratic): what learned optimizers are
meta-trained on. `REAL_DATA_FAMILIES` are further families on named datasets for users.
The held-out evaluation suites, kept apart on purpose, are in `suites.py`. A name maps to
a builder `data_dir -> TaskFamily`; datasets load lazily, on first use.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from learned_opt.tasks import datasets
from learned_opt.tasks.base import TaskFamily
from learned_opt.tasks.image import ConvNetFamily, LogisticRegressionFamily, MLPImageFamily
from learned_opt.tasks.language import CharLSTMFamily, TransformerLMFamily
from learned_opt.tasks.quadratic import QuadraticFamily

# Inner steps per task in meta-training (its truncation schedule samples up to this);
# the held-out suite's long-horizon tasks run 10x this.
META_TRAIN_HORIZON = 200


@dataclasses.dataclass(frozen=True)
class FamilySpec:
  name: str
  build: Callable[[str | None], TaskFamily]  # data_dir -> family
  data: str
  description: str


def image_builder(name: str) -> Callable[[str | None], datasets.ImageData]:
  """`data_dir -> ImageData` of the named image dataset (loaded when called)."""
  return lambda data_dir: datasets.image_dataset(name, data_dir)


def text_builder(name: str) -> Callable[[str | None], datasets.TextData]:
  """`data_dir -> TextData` of the named text dataset (loaded when called)."""
  return lambda data_dir: datasets.text_dataset(name, data_dir)


_SYN_IMG, _SYN_TXT = image_builder("synthetic"), text_builder("synthetic")


def _mnist8x8(data_dir):
  return datasets.downsample(datasets.image_dataset("mnist", data_dir), 8)


def _synthetic8x8(class_separation):
  return lambda data_dir: datasets.synthetic_images(image_shape=(8, 8, 1),
                                                    class_separation=class_separation)


# Celo2's meta-training MLPs: 64-32-10 on 8x8 images (2,410 parameters, the reference
# size of the scale suite); widths sampled in 16-32 as task augmentation.
_TINY_MLP = dict(width_range=(16, 32), max_depth=1)

META_TRAIN_FAMILIES: dict[str, FamilySpec] = {s.name: s for s in [
    FamilySpec("quadratic", lambda d: QuadraticFamily(dim=32), "offline",
               "32-d noisy quadratics, condition number 1..1e3"),
    FamilySpec("logreg_synthetic", lambda d: LogisticRegressionFamily(_SYN_IMG(d)), "offline",
               "logistic regression on synthetic 16x16 images"),
    FamilySpec("mlp_synthetic", lambda d: MLPImageFamily(_SYN_IMG(d)), "offline",
               "MLP (width 32-128, depth 1-3, 4 activations) on synthetic images"),
    FamilySpec("mlp_synthetic8x8", lambda d: MLPImageFamily(_synthetic8x8(0.8)(d), **_TINY_MLP),
               "offline", "MLP 64-(16..32)-10 on synthetic 8x8 images"),
    FamilySpec("mlp_synthetic8x8_hard", lambda d: MLPImageFamily(_synthetic8x8(0.5)(d), **_TINY_MLP),
               "offline", "MLP 64-(16..32)-10 on synthetic 8x8 images, classes closer together"),
    FamilySpec("conv_synthetic", lambda d: ConvNetFamily(_SYN_IMG(d)), "offline",
               "3-layer conv net on synthetic images"),
    FamilySpec("lstm_synthetic", lambda d: CharLSTMFamily(_SYN_TXT(d)), "offline",
               "char LSTM LM (hidden 32-64) on a synthetic Markov text"),
    FamilySpec("transformer_synthetic", lambda d: TransformerLMFamily(_SYN_TXT(d)), "offline",
               "2-layer transformer LM (d=64) on a synthetic Markov text"),
]}

REAL_DATA_FAMILIES: dict[str, FamilySpec] = {s.name: s for s in [
    FamilySpec("mlp_mnist", lambda d: MLPImageFamily(image_builder("mnist")(d)), "mnist", "MLP on MNIST"),
    FamilySpec("mlp_mnist8x8", lambda d: MLPImageFamily(_mnist8x8(d), **_TINY_MLP), "mnist",
               "MLP 64-(16..32)-10 on MNIST downsampled to 8x8 (Celo2's task)"),
    FamilySpec("logreg_mnist", lambda d: LogisticRegressionFamily(image_builder("mnist")(d)), "mnist",
               "logistic regression on MNIST"),
    FamilySpec("conv_mnist", lambda d: ConvNetFamily(image_builder("mnist")(d)), "mnist", "conv net on MNIST"),
    FamilySpec("mlp_fashion_mnist", lambda d: MLPImageFamily(image_builder("fashion_mnist")(d)),
               "fashion_mnist", "MLP on Fashion-MNIST"),
    FamilySpec("conv_cifar10", lambda d: ConvNetFamily(image_builder("cifar10")(d)), "cifar10",
               "conv net on CIFAR-10"),
    FamilySpec("lstm_tiny_shakespeare", lambda d: CharLSTMFamily(text_builder("tiny_shakespeare")(d)),
               "tiny_shakespeare", "char LSTM LM on tiny shakespeare"),
    FamilySpec("transformer_tiny_shakespeare",
               lambda d: TransformerLMFamily(text_builder("tiny_shakespeare")(d)), "tiny_shakespeare",
               "transformer LM on tiny shakespeare"),
]}

def _all_families() -> dict[str, FamilySpec]:
  return {**META_TRAIN_FAMILIES, **REAL_DATA_FAMILIES}


def family_names() -> list[str]:
  return list(_all_families())


def get_family(name: str, data_dir: str | None = None) -> TaskFamily:
  """Builds the named family (meta-training or real-data registry), loading its data.

  Raises:
    KeyError: `name` is not registered; the message lists the valid names.
    DatasetNotFoundError: the family's dataset is not available locally.
  """
  specs = _all_families()
  if name not in specs:
    raise KeyError(f"unknown task family {name!r}; registered families: {', '.join(specs)}")
  return specs[name].build(data_dir)
