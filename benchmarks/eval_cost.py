"""What one more optimizer will cost `lopt eval` on a suite, before spending the hour.

For every task of the suite, times a training step of tuned Adam and of each
`--optimizer` side by side in one process (a jitted `lax.scan` of `--steps` steps of
the loop `lopt eval` runs, timed on its second call), prints the ratio to Adam and
projects each optimizer's evaluation time on the task:

  runs x task budget x time per step,  runs = grid points x tuning seeds
                                              + the other seeds (tuned optimizers),
                                              or the seeds (those run as is).

The projection assumes the vmapped grid costs its size in single runs (on a CPU it does,
about) and leaves out compilation and the final evaluation batches; with `--cache` the
Adam result's recorded wall time (from whatever machine and load computed it) is printed
beside Adam's projection as a check. Speeds are only comparable within one run.

Usage: python benchmarks/eval_cost.py --suite heldout_scale --optimizer run/final.lopt
         [--optimizer NAME ...] [--seeds 3] [--tune-seeds 1] [--steps 20]
         [--tasks a,b] [--cache reports/cache] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from learned_opt.meta_train.eval import candidates
from learned_opt.meta_train.inner import loop
from learned_opt.tasks.suites import get_suite


def seconds_per_step(task, cand, *, steps: int, num_steps: int, full_batch: bool) -> float:
  """Wall seconds per training step of `cand` on `task` (compilation excluded)."""
  grid = cand.grid or (0.0,)
  tx = cand.make(jnp.float32(grid[len(grid) // 2]), cand.aux, num_steps)
  keys = jax.random.split(jax.random.key(0), steps)
  run = jax.jit(lambda params: loop.scan_steps_with_state(task, tx, params, keys,
                                                          full_batch=full_batch)[2])
  params = task.init(jax.random.key(1))
  jax.block_until_ready(run(params))
  start = time.perf_counter()
  jax.block_until_ready(run(params))
  return (time.perf_counter() - start) / steps


def runs(cand, *, seeds: int, tune_seeds: int) -> int:
  if not cand.grid:
    return seeds
  return len(cand.grid) * min(tune_seeds, seeds) + max(seeds - tune_seeds, 0)


def _recorded_minutes(cache_dir, task_name, name):
  path = os.path.join(cache_dir or "", task_name, f"{name}.json")
  if not cache_dir or not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)["result"]["wall_s"] / 60.0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", default="heldout")
  parser.add_argument("--optimizer", action="append", default=[])
  parser.add_argument("--tasks", default=None)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--tune-seeds", type=int, default=1)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--cache", default=None)
  parser.add_argument("--data-dir", default=os.environ.get("LOPT_DATA_DIR"))
  args = parser.parse_args()

  suite = get_suite(args.suite, args.data_dir)
  names = args.tasks.split(",") if args.tasks else list(suite)
  cands = [candidates.resolve("adam")] + [candidates.resolve(n) for n in args.optimizer]
  totals = {c.name: 0.0 for c in cands}
  print(f"{'task':36s} {'optimizer':24s} {'ms/step':>9s} {'x adam':>7s} {'runs':>5s} "
        f"{'projected min':>14s}")
  for name in names:
    spec = suite[name]
    task = spec.build(args.data_dir).task()
    adam_s = None
    for cand in cands:
      s = seconds_per_step(task, cand, steps=args.steps, num_steps=spec.num_steps,
                           full_batch=spec.full_batch)
      adam_s = adam_s or s
      n = runs(cand, seeds=args.seeds, tune_seeds=args.tune_seeds)
      minutes = n * spec.num_steps * s / 60.0
      totals[cand.name] += minutes
      recorded = _recorded_minutes(args.cache, name, cand.name) if cand.name == "adam" else None
      note = f"  (cached run: {recorded:.1f} min)" if recorded is not None else ""
      print(f"{name:36s} {cand.name:24s} {1e3 * s:9.3f} {s / adam_s:7.2f} {n:5d} "
            f"{minutes:14.1f}{note}", flush=True)
  print()
  for cand_name, minutes in totals.items():
    print(f"suite {args.suite}: {cand_name} projected {minutes:.1f} min")


if __name__ == "__main__":
  main()
