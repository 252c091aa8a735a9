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
# A final loss this far (relative) above the initial one is a divergence. The initial
# loss is one minibatch's and the final one the evaluation batches' mean, so a run that
# stalled at its initialization differs from it by minibatch noise (0.1% measured on
# conv_mnist): a stall is a failure the loss ratios show, not a divergence.
DIVERGENCE_RTOL = 0.02
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
  """Any seed with a non-finite loss, or a final loss above its initial loss by more
  than `DIVERGENCE_RTOL`.

  Args:
    curves: [seeds, steps] training losses (step 0 = the initial parameters).
    final_losses: [seeds] final training losses.
  """
  if not (np.all(np.isfinite(curves)) and np.all(np.isfinite(final_losses))):
    return True
  return bool(np.any(final_losses > curves[:, 0] + DIVERGENCE_RTOL * np.abs(curves[:, 0])))


def result_diverged(result: dict) -> bool:
  """`diverged` of one stored optimizer result, recomputed from its per-seed initial and
  final losses where it holds them (so results stored under an earlier criterion are
  judged by the current one), else its stored flag."""
  curves, finals = result.get("curves_per_seed"), result.get("final_train_loss_per_seed")
  if not curves or not finals:
    return bool(result["diverged"])
  first = np.asarray([np.nan if c[0] is None else c[0] for c in curves], np.float64)
  last = np.asarray([np.nan if f is None else f for f in finals], np.float64)
  any_nonfinite = any(x is None for c in curves for x in c)
  return any_nonfinite or diverged(first[:, None], last)


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


def iqm(values) -> float:
  """Interquartile mean: the mean of the middle half of the sorted values (25% cut from
  each end, as `scipy.stats.trim_mean(values, 0.25)`; Agarwal et al. 2021 recommend it
  over the mean and the median for few runs)."""
  x = np.sort(np.asarray(values, np.float64).ravel())
  if x.size == 0:
    raise ValueError("iqm of no values")
  k = int(0.25 * x.size)
  return float(np.mean(x[k:x.size - k]))


def bootstrap_iqm(per_task: list, *, confidence: float = 0.95, resamples: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the IQM over tasks and seeds.

  Each resample draws tasks with replacement and, within each drawn task, its seeds with
  replacement (a two-level bootstrap: tasks vary more than seeds), then takes the IQM of
  all drawn values.

  Args:
    per_task: one sequence of per-seed values per task.
    confidence: the interval's coverage.
    resamples: bootstrap resamples.
    seed: the resampling RNG's seed (the interval is deterministic).
  """
  tasks = [np.asarray(v, np.float64) for v in per_task if len(v)]
  if not tasks:
    raise ValueError("bootstrap_iqm of no tasks")
  rng = np.random.default_rng(seed)
  stats = np.empty(resamples)
  for b in range(resamples):
    picked = rng.integers(0, len(tasks), len(tasks))
    stats[b] = iqm(np.concatenate([tasks[i][rng.integers(0, tasks[i].size, tasks[i].size)]
                                   for i in picked]))
  tail = 100 * (1 - confidence) / 2
  lo, hi = np.percentile(stats, [tail, 100 - tail])
  return float(lo), float(hi)


def _ratio(mine, ref) -> float:
  if mine is None:
    return math.inf
  if ref is None:
    return 0.0
  return mine / ref if ref > 0 else math.inf


def summarize(tasks: dict[str, dict], *, reference: str = "adam") -> dict[str, dict]:
  """Per optimizer, over the tasks it shares with `reference` (tuned AdamW-cosine when
  evaluated): how often it beats `reference` and every tuned baseline on final training
  loss, the median speedup, the IQM of the per-seed speedups with a 95% bootstrap
  interval over tasks and seeds, the worst final train and test loss ratios, and the
  tasks where it diverged.

  Args:
    tasks: task name -> task result (see `evaluation.evaluate_task`).
    reference: the optimizer speedups and ratios are measured against.
  """
  names = []
  for t in tasks.values():
    names += [n for n in t["optimizers"] if n not in names]
  tuned = [n for n in names if any(t["optimizers"].get(n, {}).get("kind") == "tuned"
                                   for t in tasks.values())]
  out = {}
  for name in names:
    beats, ratios, test_ratios, speeds, per_seed, divs, n = 0, [], [], [], [], [], 0
    beats_each = {b: [0, 0] for b in tuned if b != name}
    for task_name, t in tasks.items():
      opts = t["optimizers"]
      if name not in opts or reference not in opts:
        continue
      n += 1
      mine = opts[name]
      if result_diverged(mine):
        divs.append(task_name)
      ratio = _ratio(mine["final_train_loss"], opts[reference]["final_train_loss"])
      beats += ratio < 1
      ratios.append((ratio, task_name))
      test_ratios.append((_ratio(mine.get("test_loss"), opts[reference].get("test_loss")), task_name))
      speeds.append(mine["speedup_bound"])
      if mine.get("speedup_per_seed"):
        per_seed.append(mine["speedup_per_seed"])
      for b, count in beats_each.items():
        if b in opts:
          count[1] += 1
          count[0] += _ratio(mine["final_train_loss"], opts[b]["final_train_loss"]) < 1
    if not n:
      continue
    worst, worst_test = max(ratios), max(test_ratios)
    summary = {
        "num_tasks": n,
        "frac_beats_reference": beats / n,
        "frac_beats": {b: c[0] / c[1] for b, c in beats_each.items() if c[1]},
        "median_speedup": float(np.median(speeds)),
        "worst_loss_ratio": finite_or_none(worst[0]),
        "worst_task": worst[1],
        "worst_test_loss_ratio": finite_or_none(worst_test[0]),
        "worst_test_task": worst_test[1],
        "diverged_tasks": divs,
    }
    if per_seed:
      lo, hi = bootstrap_iqm(per_seed)
      summary.update(iqm_speedup=iqm(np.concatenate([np.asarray(v, float) for v in per_seed])),
                     iqm_speedup_ci95=[lo, hi])
    out[name] = summary
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
