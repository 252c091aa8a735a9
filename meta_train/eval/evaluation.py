"""Generalization evaluation: train every task of a suite with every optimizer; compare.

`evaluate_task` trains one held-out task with each `Candidate` (see `candidates.py`)
on the same seeds, hence the same initializations and the same minibatches, and the
same step budget. Tuned baselines run their whole learning-rate grid in one vmapped,
jitted loop and keep the value with the best mean final training loss (the whole grid
is recorded). `evaluate_suite` does this for a suite (in-process, in worker processes,
or on a Ray cluster), writes `results.json` after every task (so an interrupted
evaluation resumes) and summarizes against tuned Adam with `eval_metrics.summarize`.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import tempfile
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import learned_opt
from learned_opt import _extras
from learned_opt.meta_train.eval import candidates as eval_optimizers
from learned_opt.meta_train.eval import metrics as M
from learned_opt.meta_train.inner import loop
from learned_opt.tasks.suites import SuiteTask, get_suite

RESULTS_FILE = "results.json"
RESULTS_FORMAT = 1
REFERENCE = "adam"
CURVE_POINTS = 200
# The shared grid loop and its trace counter (tests assert no recompilation).
run_grid, seed_keys, TRACE_COUNT = loop.run_grid, loop.seed_keys, loop.TRACE_COUNT


def _best_index(final_train: np.ndarray) -> int:
  mean = np.mean(np.where(np.isfinite(final_train), final_train, np.inf), axis=1)
  return int(np.argmin(mean))


def evaluate_task(suite_task: SuiteTask, candidates: Sequence[eval_optimizers.Candidate], *,
                  seeds: int = 3, first_seed: int = 0, data_dir: Optional[str] = None,
                  curve_points: int = CURVE_POINTS, on_candidate=None) -> dict:
  """Trains one suite task with every candidate; returns its JSON-able result.

  Args:
    suite_task: the task, its step budget and batch mode.
    candidates: optimizers to compare (the one named `REFERENCE`, tuned Adam, is the
      reference of the speedups when present).
    seeds: number of seeds (initializations and batch orders), the same for all.
    first_seed: seed of the first run.
    data_dir: local dataset root (default: $LOPT_DATA_DIR).
    curve_points: loss-curve points kept per optimizer in the result.
    on_candidate: optional callback(candidate_name) after each candidate (progress).

  Returns:
    {"num_steps", "full_batch", "description", "data", "optimizers": {name: {...}}}.
  """
  task = suite_task.build(data_dir).task()
  keys = seed_keys(seeds, first_seed)
  T, fb = suite_task.num_steps, suite_task.full_batch
  results = {}
  for cand in candidates:
    grid = cand.grid or (0.0,)
    start = time.perf_counter()
    losses, final_train, final_test = jax.device_get(run_grid(
        task, jnp.asarray(grid, jnp.float32), keys, cand.aux, make=cand.make, num_steps=T,
        full_batch=fb))
    wall = time.perf_counter() - start
    best = _best_index(final_train)
    curves = np.asarray(losses[best], np.float64)
    steps, curve = M.downsample(curves.mean(axis=0), curve_points)
    res = {
        "kind": cand.kind,
        "lr": float(grid[best]) if cand.grid else None,
        "grid": ({"lr": list(grid), "final_train_loss": M.jsonable(np.mean(final_train, axis=1))}
                 if cand.grid else None),
        "final_train_loss": M.finite_or_none(np.mean(final_train[best])),
        "final_train_loss_per_seed": M.jsonable(final_train[best]),
        "test_loss": M.finite_or_none(np.mean(final_test[best])),
        "initial_loss": M.finite_or_none(np.mean(curves[:, 0])),
        "diverged": M.diverged(curves, final_train[best]),
        "curve_steps": steps,
        "curve": curve,
        "wall_s": wall,
        "fingerprint": cand.fingerprint,
    }
    if fb:
      inc = M.max_relative_increase(curves)
      res["max_relative_increase"] = M.finite_or_none(inc)
      res["monotone"] = M.is_monotone(curves)
    results[cand.name] = res
    if on_candidate is not None:
      on_candidate(cand.name)
  return add_speedups({"num_steps": T, "full_batch": fb, "description": suite_task.description,
                       "data": suite_task.data, "optimizers": results})


def add_speedups(task_result: dict) -> dict:
  """Adds (or refreshes) every optimizer's speedup against `REFERENCE`, if it was run."""
  opts = task_result["optimizers"]
  if REFERENCE in opts:
    curves = {n: (r["curve_steps"], r["curve"]) for n, r in opts.items()}
    speed = M.speedups(curves, reference=REFERENCE, num_steps=task_result["num_steps"],
                       full_batch=task_result["full_batch"])
    for name, s in speed.items():
      opts[name].update(s)
  return task_result


# ---- suites ------------------------------------------------------------------------------
def _write_json(path: str, data: dict) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(data, f, indent=1, allow_nan=False)
  os.replace(tmp, path)


def load_results(run_dir: str) -> dict:
  path = os.path.join(run_dir, RESULTS_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{run_dir!r} holds no {RESULTS_FILE}: expected the folder written by "
                     "`lopt eval --out`")
  with open(path) as f:
    return json.load(f)


def _task_worker(job: str) -> str:
  """Evaluates one task in a worker process; JSON in, JSON out (no pickled objects)."""
  job = json.loads(job)
  cands = [eval_optimizers.resolve(n, lr_grid=tuple(job["lr_grid"])) for n in job["optimizers"]]
  suite_task = get_suite(job["suite"], job["data_dir"])[job["task"]]
  return json.dumps(M.jsonable(evaluate_task(
      suite_task, cands, seeds=job["seeds"], first_seed=job["first_seed"],
      data_dir=job["data_dir"])), allow_nan=False)


def _reusable(old: dict, new: dict, specs: dict, candidates) -> dict:
  """Per-task optimizer results of a previous evaluation that this one can keep."""
  if any(old.get(k) != new[k] for k in ("format", "suite", "seeds", "first_seed", "lr_grid")):
    return {}
  prints = {c.name: c.fingerprint for c in candidates}
  kept = {}
  for name, t in old.get("tasks", {}).items():
    spec = specs.get(name)
    if spec is None or (t["num_steps"], t["full_batch"]) != (spec.num_steps, spec.full_batch):
      continue
    # Results of optimizers not asked for this time stay (same seeds and grid); those
    # asked for again stay only if they are the same optimizer (same fingerprint).
    opts = {n: r for n, r in t["optimizers"].items()
            if n not in prints or prints[n] == r.get("fingerprint")}
    if opts:
      kept[name] = {**t, "optimizers": opts}
  return kept


def evaluate_suite(suite: str | dict[str, SuiteTask], optimizers: Sequence[str], *, out_dir: str, seeds: int = 3,
                   first_seed: int = 0, data_dir: Optional[str] = None,
                   lr_grid: Sequence[float] = eval_optimizers.DEFAULT_LR_GRID,
                   tasks: Optional[Sequence[str]] = None, workers: int = 1,
                   ray_address: Optional[str] = None, progress: bool = True,
                   resume: bool = True) -> dict:
  """Evaluates `optimizers` on every task of `suite`; writes `out_dir/results.json`.

  Args:
    suite: a suite name (see `learned_opt.tasks.SUITES`), or a dict of `SuiteTask`s
      (evaluated in-process only).
    optimizers: names for `eval_optimizers.resolve` (baselines included explicitly).
    out_dir: run folder; `results.json` is rewritten after every task.
    seeds, first_seed: seeds of every task (the same for all optimizers).
    data_dir: local dataset root (default: $LOPT_DATA_DIR).
    lr_grid: learning rates of the tuned baselines.
    tasks: evaluate only these task names of the suite.
    workers: tasks evaluated in parallel by this many local processes (1: in-process).
    ray_address: evaluate tasks on a Ray cluster ("auto" or an address) instead.
    progress: show a progress bar.
    resume: keep the (task, optimizer) results already in `out_dir/results.json` from
      a run with the same suite, seeds and grid (and the same checkpoint for learned
      optimizers): only missing ones run, so optimizers can be added later, and results
      of optimizers not named this time are kept.
  """
  lr_grid = tuple(float(x) for x in lr_grid)
  candidates = [eval_optimizers.resolve(n, lr_grid=lr_grid) for n in optimizers]  # fail early
  if isinstance(suite, dict):
    if workers > 1 or ray_address is not None:
      raise ValueError("a custom suite (a dict) runs in-process only: use workers=1, no Ray")
    specs, suite = suite, "custom"
  else:
    specs = get_suite(suite, data_dir)
  names = list(specs) if tasks is None else list(tasks)
  bad = [n for n in names if n not in specs]
  if bad:
    raise ValueError(f"unknown task {bad[0]!r} in suite {suite!r}; it has: {', '.join(specs)}")
  os.makedirs(out_dir, exist_ok=True)
  results = {"format": RESULTS_FORMAT, "suite": suite, "seeds": seeds, "first_seed": first_seed,
             "lr_grid": list(lr_grid), "optimizers": [c.name for c in candidates],
             "reference": REFERENCE, "lopt_version": learned_opt.__version__, "tasks": {}}
  path = os.path.join(out_dir, RESULTS_FILE)
  if resume and os.path.isfile(path):
    results["tasks"] = _reusable(load_results(out_dir), results, specs, candidates)
    for t in results["tasks"].values():
      results["optimizers"] += [n for n in t["optimizers"] if n not in results["optimizers"]]
  todo = {}  # task -> candidates still to run
  for n in names:
    have = results["tasks"].get(n, {}).get("optimizers", {})
    missing = [c for c in candidates if c.name not in have]
    if missing:
      todo[n] = missing
  bar = None
  if progress:
    bar = tqdm.tqdm(total=sum(map(len, todo.values())), desc=f"eval {suite}", unit="run",
               dynamic_ncols=True)

  def done(name, result):
    if name in results["tasks"]:  # merge with the results kept from a previous run
      result = {**result, "optimizers": {**results["tasks"][name]["optimizers"], **result["optimizers"]}}
    order = [n for n in results["optimizers"] if n in result["optimizers"]]
    result["optimizers"] = {n: result["optimizers"][n] for n in order}
    results["tasks"][name] = M.jsonable(add_speedups(result))
    results["summary"] = M.summarize(results["tasks"], reference=REFERENCE)
    _write_json(path, results)

  start = time.perf_counter()
  try:
    if workers <= 1 and ray_address is None:
      for name, missing in todo.items():
        if bar is not None:
          bar.set_postfix(task=name)
        done(name, evaluate_task(specs[name], missing, seeds=seeds, first_seed=first_seed,
                                 data_dir=data_dir, on_candidate=lambda _: bar and bar.update(1)))
    else:
      by_name = dict(zip([c.name for c in candidates], optimizers))
      jobs = [json.dumps({"suite": suite, "task": n, "lr_grid": list(lr_grid), "seeds": seeds,
                          "optimizers": [by_name[c.name] for c in missing],
                          "first_seed": first_seed, "data_dir": data_dir})
              for n, missing in todo.items()]
      if ray_address is not None:
        ray_mp = _extras.require("ray.util.multiprocessing", purpose="lopt eval --ray")
        pool = ray_mp.Pool(processes=workers if workers > 1 else None, ray_address=ray_address)
        outputs = pool.imap(_task_worker, jobs)
      else:
        # spawn: a forked JAX process can deadlock.
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        outputs = pool.map(_task_worker, jobs)
      try:
        for (name, missing), out in zip(todo.items(), outputs):
          done(name, json.loads(out))
          if bar is not None:
            bar.update(len(missing))
      finally:
        pool.close() if ray_address is not None else pool.shutdown()
  finally:
    if bar is not None:
      bar.close()
  results["wall_s"] = time.perf_counter() - start
  results["summary"] = M.summarize(results["tasks"], reference=REFERENCE)
  _write_json(path, results)
  return results
