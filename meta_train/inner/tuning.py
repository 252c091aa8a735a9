"""Per-task learning-rate tuning of a baseline: the whole grid in one jitted program.

`tune_learning_rate` trains one `Task` once per learning rate of a log-spaced grid and
keeps the rate with the lowest final training loss. The learning rate is a traced array
argument (optax factories accept an array wherever they accept a float), so the grid is
`jax.vmap`ped inside one `jax.jit` (`loop.run_grid`, the loop evaluation uses too) and
one compilation serves every grid, seed and task config of a shape. Every grid value sees
the same initialization and the same minibatches (those of `loop.train` with the same
key), so differences come from the learning rate alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.meta_train.inner import loop
from learned_opt.tasks.base import Task

MakeOptimizer = Callable[[jax.Array], optax.GradientTransformation]

# 7 log-spaced rates half a decade apart, 1e-4 ... 1e-1 (the range where tuned Adam and
# Muon land on lopt's tasks); the same grid `lopt eval` uses by default.
DEFAULT_GRID: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(-4.0, -0.99, 0.5))


class TuningResult(NamedTuple):
  """What `tune_learning_rate` found (host NumPy arrays and Python numbers).

  Attributes:
    grid: [G] the learning rates tried, in the order given.
    final_losses: [G] mean training loss over each run's last `final_window` steps (NaN
      where a run diverged to NaN).
    losses: [G, num_steps] training loss before each update, per learning rate.
    best_index: index into `grid` of the lowest final loss (non-finite counts as worst).
    best_lr: `grid[best_index]`.
    best_curve: [num_steps] `losses[best_index]`.
    all_diverged: True when no run ended finite (then `best_index` is the smallest rate).
  """
  grid: np.ndarray
  final_losses: np.ndarray
  losses: np.ndarray
  best_index: int
  best_lr: float
  best_curve: np.ndarray
  all_diverged: bool


# Traces of the shared grid loop (`loop.run_grid`; tests assert no recompilation).
TRACE_COUNT = loop.TRACE_COUNT


@dataclasses.dataclass(frozen=True)
class _FromLearningRate:
  """`make_optimizer(lr)` in `run_grid`'s `(h, aux, num_steps)` form; equal (so one
  compilation) whenever the wrapped factory is the same object."""
  make_optimizer: MakeOptimizer

  def __call__(self, lr, aux, num_steps):
    del aux, num_steps
    return self.make_optimizer(lr)


def _check_grid(grid) -> np.ndarray:
  try:
    arr = np.asarray(grid, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"grid must be a sequence of learning rates, got {grid!r}") from e
  if arr.ndim != 1 or arr.size < 1:
    raise ValueError(f"grid must be a non-empty 1-D sequence of learning rates, got shape "
                     f"{arr.shape}: {grid!r}")
  bad = [float(x) for x in arr if not (math.isfinite(x) and x > 0)]
  if bad:
    raise ValueError(f"grid must hold finite positive learning rates; got {bad} in {grid!r}")
  return arr


def tune_learning_rate(task: Task, make_optimizer: MakeOptimizer, *,
                       grid: Optional[Sequence[float]] = None, num_steps: int, seed: int = 0,
                       final_window: Optional[int] = None,
                       full_batch: bool = False) -> TuningResult:
  """Trains `task` once per learning rate in `grid`; the best has the lowest final loss.

  Args:
    task: the inner problem (a `learned_opt.tasks.Task`).
    make_optimizer: `lr -> optax.GradientTransformation`, called inside jit with `lr` a
      traced float32 scalar (e.g. `optax.adam`, `learned_opt.baselines.muon`). It is a
      static argument of the compiled program: pass the same object (a module-level
      function, not a new lambda) on every call, or each call compiles again.
    grid: learning rates to try, positive and finite (default `DEFAULT_GRID`: 7
      log-spaced values 1e-4..1e-1). Its length is part of the compiled shape.
    num_steps: training steps per run.
    seed: seeds the initialization and the minibatches, shared by all grid values; the
      runs equal `learned_opt.meta_train.train(task, make_optimizer(lr), key=jax.random.key(seed))`.
    final_window: number of last steps whose training losses are averaged into the
      final loss (default: the last 10% of steps, at least 1).
    full_batch: train on the task's deterministic full batch at every step.

  Returns:
    A `TuningResult`.

  Raises:
    ValueError: a bad grid (empty, non-finite or non-positive values), `num_steps` not a
      positive int, `final_window` outside [1, num_steps], or `make_optimizer` not callable.
  """
  lrs = _check_grid(DEFAULT_GRID if grid is None else grid)
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  window = max(1, num_steps // 10) if final_window is None else final_window
  if not isinstance(window, (int, np.integer)) or not 1 <= window <= num_steps:
    raise ValueError(f"final_window must be an int in [1, num_steps={num_steps}], got "
                     f"{final_window!r}")
  if not callable(make_optimizer):
    raise ValueError(f"make_optimizer must be a callable lr -> optax transform, got "
                     f"{make_optimizer!r}")

  losses, _, _ = loop.run_grid(task, jnp.asarray(lrs, jnp.float32), jax.random.key(seed)[None],
                               None, make=_FromLearningRate(make_optimizer),
                               num_steps=int(num_steps), full_batch=bool(full_batch),
                               final_losses=False)
  losses = losses[:, 0]
  losses = np.asarray(jax.device_get(losses), dtype=np.float64)
  final = np.mean(losses[:, -window:], axis=1)
  # A run that overflowed (inf) or went NaN ranks below every finite run.
  ranked = np.where(np.isfinite(final), final, np.inf)
  all_diverged = not np.isfinite(ranked).any()
  best = int(np.argmin(lrs)) if all_diverged else int(np.argmin(ranked))
  return TuningResult(grid=lrs, final_losses=final, losses=losses, best_index=best,
                      best_lr=float(lrs[best]), best_curve=losses[best],
                      all_diverged=bool(all_diverged))
