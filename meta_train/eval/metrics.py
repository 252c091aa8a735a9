"""Metrics of `lopt eval` computed from loss curves: speedup, divergence, summaries.

All functions take numpy arrays (host side, after the jitted runs) and return plain
Python numbers, so results serialize to JSON as they are.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

# Relative slack under which a full-batch loss step counts as "not an increase" (also
# used for divergence). A float32 loss is a sum of terms about as large as the initial
# loss (cross-entropy: log-sum-exp minus a logit, both ~2.3), so its rounding error is
# ~eps32 * |initial loss| in absolute terms, which is ~1e-5 of a loss that has come down
# 1000x; `ROUNDING` (~8 ulps) of the larger of the current and initial loss is that slack.
MONOTONE_RTOL = 1e-5
ROUNDING = 1e-6


def finite_or_none(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
  """Causal running mean over `window` steps (minibatch losses are noisy); NaN stays NaN."""
  if window <= 1:
    return curve.astype(np.float64)
  c = np.concatenate([[0.0], np.cumsum(curve.astype(np.float64))])
  idx = np.arange(1, len(curve) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def steps_to_reach(curve: np.ndarray, target: float) -> Optional[int]:
  """Number of steps until the (smoothed) curve first reaches `target`; None: never."""
  hit = np.nonzero(np.isfinite(curve) & (curve <= target))[0]
  return int(hit[0]) + 1 if hit.size else None


def diverged(curves: np.ndarray, final_losses: np.ndarray) -> bool:
  """Any seed with a non-finite loss, or a final loss above its initial loss.

  Args:
    curves: [seeds, steps] training losses (step 0 = the initial parameters).
    final_losses: [seeds] final training losses.
  """
  if not (np.all(np.isfinite(curves)) and np.all(np.isfinite(final_losses))):
    return True
  # Rounding slack: a run that never moved must not read as diverged.
  return bool(np.any(final_losses > curves[:, 0] + MONOTONE_RTOL * np.abs(curves[:, 0])))


def is_monotone(curves: np.ndarray) -> bool:
  """No step-to-step increase beyond float32 rounding (see `ROUNDING`), on any seed."""
  if not np.all(np.isfinite(curves)):
    return False
  scale = np.maximum(np.abs(curves[:, :-1]), np.abs(curves[:, :1]))
  return bool(np.all(curves[:, 1:] - curves[:, :-1] <= ROUNDING * scale))


def max_relative_increase(curves: np.ndarray) -> float:
  """Largest step-to-step loss increase relative to the loss, over seeds (full batch)."""
  if not np.all(np.isfinite(curves)):
    return math.inf
  inc = (curves[:, 1:] - curves[:, :-1]) / np.maximum(np.abs(curves[:, :-1]), 1e-30)
  return float(max(inc.max(initial=-math.inf), 0.0))


def speedups(curves: dict[str, tuple[list, list]], *, reference: str, num_steps: int,
             full_batch: bool) -> dict[str, dict]:
  """Steps each optimizer needs to reach the reference's final loss, and the speedup.

  Computed from the stored (block-mean, see `downsample`) curves, so a resumed
  evaluation that adds optimizers later gets the same numbers; the resolution is one
  block (num_steps / CURVE_POINTS steps, 1 step for short runs). Minibatch curves are
  smoothed further by a running mean over 5% of the budget (full-batch: none).

  Args:
    curves: optimizer name -> (curve_steps, curve) as stored in the results.
    reference: name of the reference (tuned Adam).
    num_steps: the step budget.
    full_batch: whether the task is full batch.

  Returns:
    name -> {"steps_to_target": int | None, "speedup": float | None,
    "speedup_bound": float}: speedup = reference steps / this optimizer's steps; when
    the target is never reached, speedup is None and `speedup_bound` (reference steps /
    budget) is an upper bound of it.
  """
  def prepare(steps, curve):
    c = np.asarray([np.nan if v is None else v for v in curve], np.float64)
    window = 1 if full_batch else max(1, len(c) // 20)
    ends = list(steps[1:]) + [num_steps]  # a block counts once it is complete
    return smooth(c, window), ends

  def reach(prepared, target):
    i = steps_to_reach(prepared[0], target)
    return None if i is None else prepared[1][i - 1]

  ref = prepare(*curves[reference])
  target = ref[0][-1] if np.isfinite(ref[0][-1]) else math.inf
  ref_steps = reach(ref, target) or num_steps
  out = {}
  for name, (steps, curve) in curves.items():
    mine = reach(prepare(steps, curve), target)
    speed = ref_steps / mine if mine else None
    out[name] = {"steps_to_target": mine, "speedup": speed,
                 "speedup_bound": speed if speed is not None else ref_steps / num_steps}
  return out


def summarize(tasks: dict[str, dict], *, reference: str = "adam") -> dict[str, dict]:
  """Per optimizer: fraction of tasks where it beats `reference`, median speedup, worst case.

  Args:
    tasks: task name -> task result (see `evaluation.evaluate_task`).
  """
  names = []
  for t in tasks.values():
    names += [n for n in t["optimizers"] if n not in names]
  out = {}
  for name in names:
    beats, ratios, speeds, divs, n = 0, [], [], [], 0
    for task_name, t in tasks.items():
      opts = t["optimizers"]
      if name not in opts or reference not in opts:
        continue
      n += 1
      mine, ref = opts[name]["final_train_loss"], opts[reference]["final_train_loss"]
      if opts[name]["diverged"]:
        divs.append(task_name)
      if mine is not None and ref is not None:
        beats += mine < ref
        ratios.append((mine / ref if ref > 0 else math.inf, task_name))
      else:
        ratios.append((math.inf if mine is None else 0.0, task_name))
      speeds.append(opts[name]["speedup_bound"])
    if not n:
      continue
    worst = max(ratios)
    out[name] = {
        "num_tasks": n,
        "frac_beats_reference": beats / n,
        "median_speedup": float(np.median(speeds)),
        "worst_loss_ratio": finite_or_none(worst[0]),
        "worst_task": worst[1],
        "diverged_tasks": divs,
    }
  return out


def downsample(curve: np.ndarray, points: int) -> tuple[list[int], list[Optional[float]]]:
  """Block means of a curve at <= `points` points, for JSON and plots."""
  n = len(curve)
  if n <= points:
    return list(range(n)), [finite_or_none(v) for v in curve]
  edges = np.linspace(0, n, points + 1).astype(int)
  steps = [int(e) for e in edges[:-1]]
  with np.errstate(all="ignore"):
    vals = [finite_or_none(np.mean(curve[a:b])) for a, b in zip(edges[:-1], edges[1:])]
  return steps, vals


def jsonable(x: Any) -> Any:
  """Numpy scalars/arrays to Python numbers/lists; non-finite floats to None."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (float, np.floating)):
    return finite_or_none(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x
