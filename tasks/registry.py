"""Named task families for meta-training and the held-out evaluation suite.

Two registries, kept apart on purpose: `META_TRAIN_FAMILIES` (offline, synthetic or
quadratic; what learned optimizers are meta-trained on) and `HELDOUT_SUITE` (other
datasets, architectures, 4x wider models and 10x longer horizons than meta-training,
including the real MNIST files and tiny shakespeare) for evaluation; `HELDOUT_OFFLINE` is a
held-out suite on generated data only (the README Quickstart's). `REAL_DATA_FAMILIES`
are further families on named datasets for users. A name maps to a builder
`data_dir -> TaskFamily`; datasets load lazily, on first use.
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


@dataclasses.dataclass(frozen=True)
class SuiteTask:
  """One held-out task: a family at its default config, a step budget, a batch mode."""
  name: str
  build: Callable[[str | None], TaskFamily]
  num_steps: int
  data: str
  description: str
  full_batch: bool = False


def _img(name):
  return lambda data_dir: datasets.image_dataset(name, data_dir)


def _txt(name):
  return lambda data_dir: datasets.text_dataset(name, data_dir)


_SYN_IMG, _SYN_TXT = _img("synthetic"), _txt("synthetic")

META_TRAIN_FAMILIES: dict[str, FamilySpec] = {s.name: s for s in [
    FamilySpec("quadratic", lambda d: QuadraticFamily(dim=32), "offline",
               "32-d noisy quadratics, condition number 1..1e3"),
    FamilySpec("logreg_synthetic", lambda d: LogisticRegressionFamily(_SYN_IMG(d)), "offline",
               "logistic regression on synthetic 16x16 images"),
    FamilySpec("mlp_synthetic", lambda d: MLPImageFamily(_SYN_IMG(d)), "offline",
               "MLP (width 32-128, depth 1-3, 4 activations) on synthetic images"),
    FamilySpec("conv_synthetic", lambda d: ConvNetFamily(_SYN_IMG(d)), "offline",
               "3-layer conv net on synthetic images"),
    FamilySpec("lstm_synthetic", lambda d: CharLSTMFamily(_SYN_TXT(d)), "offline",
               "char LSTM LM (hidden 32-64) on a synthetic Markov text"),
    FamilySpec("transformer_synthetic", lambda d: TransformerLMFamily(_SYN_TXT(d)), "offline",
               "2-layer transformer LM (d=64) on a synthetic Markov text"),
]}

REAL_DATA_FAMILIES: dict[str, FamilySpec] = {s.name: s for s in [
    FamilySpec("mlp_mnist", lambda d: MLPImageFamily(_img("mnist")(d)), "mnist", "MLP on MNIST"),
    FamilySpec("logreg_mnist", lambda d: LogisticRegressionFamily(_img("mnist")(d)), "mnist",
               "logistic regression on MNIST"),
    FamilySpec("conv_mnist", lambda d: ConvNetFamily(_img("mnist")(d)), "mnist", "conv net on MNIST"),
    FamilySpec("mlp_fashion_mnist", lambda d: MLPImageFamily(_img("fashion_mnist")(d)),
               "fashion_mnist", "MLP on Fashion-MNIST"),
    FamilySpec("conv_cifar10", lambda d: ConvNetFamily(_img("cifar10")(d)), "cifar10",
               "conv net on CIFAR-10"),
    FamilySpec("lstm_tiny_shakespeare", lambda d: CharLSTMFamily(_txt("tiny_shakespeare")(d)),
               "tiny_shakespeare", "char LSTM LM on tiny shakespeare"),
    FamilySpec("transformer_tiny_shakespeare",
               lambda d: TransformerLMFamily(_txt("tiny_shakespeare")(d)), "tiny_shakespeare",
               "transformer LM on tiny shakespeare"),
]}

_LONG = 10 * META_TRAIN_HORIZON
HELDOUT_SUITE: dict[str, SuiteTask] = {t.name: t for t in [
    SuiteTask("mlp_mnist", lambda d: MLPImageFamily(_img("mnist")(d), width_range=(128, 128), max_depth=2),
              1000, "mnist", "MLP 784-128-128-10 on the MNIST files (other dataset)"),
    SuiteTask("logreg_mnist_fullbatch", lambda d: LogisticRegressionFamily(_img("mnist")(d)),
              500, "mnist", "logistic regression on 1000 MNIST images, full batch", full_batch=True),
    SuiteTask("conv_mnist", lambda d: ConvNetFamily(_img("mnist")(d)), 1000, "mnist",
              "conv net on 28x28 MNIST (other dataset and input size)"),
    SuiteTask("mlp_wide_synthetic",
              lambda d: MLPImageFamily(_SYN_IMG(d), width_range=(512, 512), max_depth=2), 1000,
              "offline", "MLP 4x wider than meta-training (width 512)"),
    SuiteTask("mlp_long_synthetic", lambda d: MLPImageFamily(_SYN_IMG(d)), _LONG, "offline",
              "meta-training MLP family at a 10x longer horizon"),
    SuiteTask("quadratic_illcond_long", lambda d: QuadraticFamily(dim=64, log10_cond_range=(4.0, 4.0)),
              _LONG, "offline", "64-d quadratic, condition 1e4, 10x horizon (other conditioning)"),
    SuiteTask("transformer_tiny_shakespeare",
              lambda d: TransformerLMFamily(_txt("tiny_shakespeare")(d)), 1000, "tiny_shakespeare",
              "transformer LM on real text (other dataset)"),
    SuiteTask("lstm_tiny_shakespeare", lambda d: CharLSTMFamily(_txt("tiny_shakespeare")(d)), 1000,
              "tiny_shakespeare", "char LSTM LM on real text (other dataset)"),
    SuiteTask("transformer_wide_synthetic",
              lambda d: TransformerLMFamily(_SYN_TXT(d), model_dim=256), 1000, "offline",
              "transformer LM 4x wider than meta-training (d=256)"),
]}

# The README's main job and CI: the cheap held-out tasks at reduced step budgets (minutes
# on 2 cores, where the full suite takes hours); same tasks, so results stay comparable.
HELDOUT_SHORT: dict[str, SuiteTask] = {t.name: t for t in [
    dataclasses.replace(HELDOUT_SUITE["mlp_mnist"], num_steps=300),
    dataclasses.replace(HELDOUT_SUITE["logreg_mnist_fullbatch"], num_steps=200),
    dataclasses.replace(HELDOUT_SUITE["mlp_wide_synthetic"], num_steps=300),
    HELDOUT_SUITE["quadratic_illcond_long"],
    dataclasses.replace(HELDOUT_SUITE["lstm_tiny_shakespeare"], num_steps=100),
]}


def _rgb32_images(data_dir):
  del data_dir  # generated offline
  return datasets.synthetic_images(image_shape=(32, 32, 3), seed=1)


# The README Quickstart's held-out suite: no data files, a few minutes on 2 CPU cores
# (convolutional and recurrent models are left out: on CPU they cost minutes per task).
# Every task lies outside every meta-training family's distribution: other conditioning
# or dimension, 5-10x longer horizons, a 4x wider model, another input size.
HELDOUT_OFFLINE: dict[str, SuiteTask] = {t.name: t for t in [
    HELDOUT_SUITE["quadratic_illcond_long"],
    SuiteTask("quadratic_wide_noisy",
              lambda d: QuadraticFamily(dim=256, log10_cond_range=(2.0, 2.0), noise_range=(0.3, 0.3)),
              1000, "offline", "256-d quadratic (8x meta-training's), gradient noise 0.3 (3x), "
              "5x horizon"),
    SuiteTask("mlp_narrow_long_synthetic",
              lambda d: MLPImageFamily(_SYN_IMG(d), width_range=(32, 32), max_depth=2),
              5 * META_TRAIN_HORIZON, "offline", "MLP 256-32-32-10 on synthetic images at a 5x "
              "longer horizon"),
    dataclasses.replace(HELDOUT_SUITE["mlp_wide_synthetic"], num_steps=60),
    SuiteTask("mlp_rgb32_synthetic",
              lambda d: MLPImageFamily(_rgb32_images(d), width_range=(64, 64), max_depth=2), 100,
              "offline", "MLP 3072-64-64-10 on synthetic 32x32 color images (other input size)"),
]}
SUITES: dict[str, dict[str, SuiteTask]] = {"heldout": HELDOUT_SUITE, "heldout_short": HELDOUT_SHORT,
                                           "heldout_offline": HELDOUT_OFFLINE}


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


def get_suite_task(name: str) -> SuiteTask:
  if name not in HELDOUT_SUITE:
    raise KeyError(f"unknown held-out task {name!r}; the held-out suite has: {', '.join(HELDOUT_SUITE)}")
  return HELDOUT_SUITE[name]
