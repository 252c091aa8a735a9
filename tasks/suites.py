"""The held-out evaluation suites: tasks at a step budget, kept apart from meta-training.

`HELDOUT_SUITE` holds other datasets, architectures, 4x wider models and 10x longer
horizons than meta-training, including the real MNIST files and tiny shakespeare;
`HELDOUT_SHORT` the cheap ones at reduced budgets; `HELDOUT_OFFLINE` a suite on generated
data only (the README Quickstart's); `HELDOUT_SCALE` models >= 100x the meta-training
tasks' size at realistic budgets; `SAFEGUARD_SUITE` full-batch tasks built so that a
plain learned optimizer is likely to fail: parameters rescaled 1000x smaller (a step of
the size the optimizer learned is then 1000x too large in the model's own coordinates)
and a 10x longer horizon; SafeRate must never increase the full-batch loss there. Suite
names join with "+" (`heldout_short+safeguard`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from learned_opt.tasks import datasets
from learned_opt.tasks.augment import ParamScaleFamily
from learned_opt.tasks.base import TaskFamily
from learned_opt.tasks.image import ConvNetFamily, LogisticRegressionFamily, MLPImageFamily
from learned_opt.tasks.language import CharLSTMFamily, TransformerLMFamily
from learned_opt.tasks.quadratic import QuadraticFamily
from learned_opt.tasks.registry import META_TRAIN_HORIZON
from learned_opt.tasks.registry import image_builder as _img
from learned_opt.tasks.registry import text_builder as _txt

_SYN_IMG, _SYN_TXT = _img("synthetic"), _txt("synthetic")
_LONG = 10 * META_TRAIN_HORIZON


@dataclasses.dataclass(frozen=True)
class SuiteTask:
  """One held-out task: a family at its default config, a step budget, a batch mode."""
  name: str
  build: Callable[[str | None], TaskFamily]
  num_steps: int
  data: str
  description: str
  full_batch: bool = False


def rescaled_params_family(base: TaskFamily, scale: float) -> ParamScaleFamily:
  """`base` with its parameters stored `scale` x larger (e.g. 1e-3: 1000x smaller), same
  losses: `ParamScaleFamily` at the one scale 1 / scale for every tensor.

  Gradients scale by 1/scale and curvature by 1/scale^2, so an optimizer whose step
  size is not relative to the parameters' scale sees a badly conditioned problem.
  """
  if not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(f"scale must be a positive number, got {scale!r}")
  return ParamScaleFamily(base, (1.0 / scale, 1.0 / scale))


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
    # Batch 16 (not 32): at d=256 Adam's step with the 7-point grid vmapped costs ~10x the
    # d=64 model's, and one tuned optimizer must fit the suite's hour.
    SuiteTask("transformer_wide_synthetic",
              lambda d: TransformerLMFamily(_SYN_TXT(d), model_dim=256, batch_size_range=(16, 16)),
              1000, "offline", "transformer LM 4x wider than meta-training (d=256), batch 16"),
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


SAFEGUARD_SUITE: dict[str, SuiteTask] = {t.name: t for t in [
    SuiteTask(
        "logreg_mnist_fullbatch_x1e-3",
        lambda d: rescaled_params_family(LogisticRegressionFamily(_img("mnist")(d)), 1e-3), 300, "mnist",
        "logistic regression on 1000 MNIST images, full batch, parameters 1000x smaller",
        full_batch=True),
    SuiteTask(
        "quadratic_illcond_fullbatch_x1e-3",
        lambda d: rescaled_params_family(QuadraticFamily(dim=64, log10_cond_range=(4.0, 4.0)), 1e-3),
        _LONG, "offline", "64-d quadratic, condition 1e4, full batch, 10x horizon, "
        "parameters 1000x smaller", full_batch=True),
    SuiteTask(
        "logreg_synthetic_fullbatch_long", lambda d: LogisticRegressionFamily(_SYN_IMG(d)),
        _LONG, "offline", "logistic regression on synthetic images, full batch, 10x horizon",
        full_batch=True),
]}

# Scale transfer, the question the field asks first (Celo2 meta-trains on 2.4k-parameter
# MLPs and evaluates up to 1.3B): each task has >= 100x the parameters of the tiny image
# MLP recipe's largest meta-training task (64-32-10 on 8x8 inputs: 2,410 parameters) at a
# realistic budget. Batches are sized so that a learning-rate-tuned optimizer (7 grid
# points on one seed, 2 more seeds at the chosen rate: 9 runs) takes under an hour on 2
# idle CPU cores even at 1.5x Adam's step cost: Adam's steps (vmapped 7-point grid, per
# run) took 54, 28 and 15 ms there, 25 min for the 9 runs on all three; the transformer
# at batch 16 and the conv net at batch 64 took 107 and 57 ms (45 min). The MLP is 256
# wide, not 1024: Newton-Schulz on 1024-wide matrices (Muon, the normalized rule's
# harness) cost 29x Adam's step there (1,075 vs 37 ms, measured side by side at load 11),
# hours per tuned optimizer; at 256 wide, 3 hidden layers, 9x (57 vs 6.3 ms).
SCALE_REFERENCE_PARAMS = 2410
HELDOUT_SCALE: dict[str, SuiteTask] = {t.name: t for t in [
    SuiteTask("transformer_scale_tiny_shakespeare",
              lambda d: TransformerLMFamily(_txt("tiny_shakespeare")(d), model_dim=128, num_heads=4,
                                            num_layers=3, seq_len=128, batch_size_range=(8, 8)),
              2000, "tiny_shakespeare", "transformer LM, d=128, 3 layers, sequence 128, "
              "batch 8 (628k parameters, 261x)"),
    SuiteTask("conv_scale_mnist",
              lambda d: ConvNetFamily(_img("mnist")(d), channels=(16, 32, 64, 128, 128),
                                      batch_size_range=(32, 32)),
              1000, "mnist", "5-layer strided conv net on 28x28 MNIST, batch 32 (246k "
              "parameters, 102x)"),
    SuiteTask("mlp_scale_mnist",
              lambda d: MLPImageFamily(_img("mnist")(d), width_range=(256, 256), max_depth=3,
                                       batch_size_range=(128, 128)),
              2000, "mnist", "MLP 784-256-256-256-10 on MNIST, batch 128 (335k parameters, "
              "139x)"),
]}

SUITES: dict[str, dict[str, SuiteTask]] = {
    "heldout": HELDOUT_SUITE, "heldout_short": HELDOUT_SHORT,
    "heldout_offline": HELDOUT_OFFLINE, "safeguard": SAFEGUARD_SUITE,
    "heldout_scale": HELDOUT_SCALE}


def get_suite(name: str, data_dir: Optional[str] = None) -> dict[str, SuiteTask]:
  """The suite `name`, or the union of "+"-joined suite names, in order.

  Raises:
    ValueError: an unknown suite name (the message lists the known ones).
  """
  del data_dir  # tasks load their data lazily, when built
  known = SUITES
  out = {}
  for part in name.split("+"):
    if part not in known:
      raise ValueError(f"unknown suite {part!r}; known suites: {', '.join(known)} "
                       "(join several with '+')")
    out.update(known[part])
  return out


def get_suite_task(name: str) -> SuiteTask:
  if name not in HELDOUT_SUITE:
    raise KeyError(f"unknown held-out task {name!r}; the held-out suite has: {', '.join(HELDOUT_SUITE)}")
  return HELDOUT_SUITE[name]
