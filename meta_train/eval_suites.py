"""Evaluation suites: the registry's held-out suites plus the safeguard stress suite.

The stress suite holds full-batch tasks built so that a plain learned optimizer is
likely to fail: parameters rescaled 1000x smaller (a step of the size the optimizer
learned is then 1000x too large in the model's own coordinates) and a 10x longer
horizon. SafeRate must never increase the full-batch loss there, whatever direction it
wraps. Suite names join with "+" (`heldout_short+safeguard`).
"""
from __future__ import annotations

from typing import Optional

from learned_opt.tasks import registry
from learned_opt.tasks.augment import ParamScaleFamily
from learned_opt.tasks.base import TaskFamily
from learned_opt.tasks.image import LogisticRegressionFamily
from learned_opt.tasks.quadratic import QuadraticFamily


def rescaled_params_family(base: TaskFamily, scale: float) -> ParamScaleFamily:
  """`base` with its parameters stored `scale` x larger (e.g. 1e-3: 1000x smaller), same
  losses: `ParamScaleFamily` at the one scale 1 / scale for every tensor.

  Gradients scale by 1/scale and curvature by 1/scale^2, so an optimizer whose step
  size is not relative to the parameters' scale sees a badly conditioned problem.
  """
  if not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(f"scale must be a positive number, got {scale!r}")
  return ParamScaleFamily(base, (1.0 / scale, 1.0 / scale))


def _mnist(data_dir):
  from learned_opt.tasks import datasets
  return datasets.image_dataset("mnist", data_dir)


def _synthetic(data_dir):
  from learned_opt.tasks import datasets
  return datasets.image_dataset("synthetic", data_dir)


_LONG = 10 * registry.META_TRAIN_HORIZON
SAFEGUARD_SUITE: dict[str, registry.SuiteTask] = {t.name: t for t in [
    registry.SuiteTask(
        "logreg_mnist_fullbatch_x1e-3",
        lambda d: rescaled_params_family(LogisticRegressionFamily(_mnist(d)), 1e-3), 300, "mnist",
        "logistic regression on 1000 MNIST images, full batch, parameters 1000x smaller",
        full_batch=True),
    registry.SuiteTask(
        "quadratic_illcond_fullbatch_x1e-3",
        lambda d: rescaled_params_family(QuadraticFamily(dim=64, log10_cond_range=(4.0, 4.0)), 1e-3),
        _LONG, "offline", "64-d quadratic, condition 1e4, full batch, 10x horizon, "
        "parameters 1000x smaller", full_batch=True),
    registry.SuiteTask(
        "logreg_synthetic_fullbatch_long", lambda d: LogisticRegressionFamily(_synthetic(d)),
        _LONG, "offline", "logistic regression on synthetic images, full batch, 10x horizon",
        full_batch=True),
]}


def suites() -> dict[str, dict[str, registry.SuiteTask]]:
  """Name -> suite (task name -> `SuiteTask`)."""
  out = dict(getattr(registry, "SUITES", {"heldout": registry.HELDOUT_SUITE}))
  out["safeguard"] = SAFEGUARD_SUITE
  return out


def get_suite(name: str, data_dir: Optional[str] = None) -> dict[str, registry.SuiteTask]:
  """The suite `name`, or the union of "+"-joined suite names, in order.

  Raises:
    ValueError: an unknown suite name (the message lists the known ones).
  """
  del data_dir  # tasks load their data lazily, when built
  known = suites()
  out = {}
  for part in name.split("+"):
    if part not in known:
      raise ValueError(f"unknown suite {part!r}; known suites: {', '.join(known)} "
                       "(join several with '+')")
    out.update(known[part])
  return out
