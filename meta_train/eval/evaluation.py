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
import sys
import threading
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import learned_opt
from learned_opt._atomic import write_atomic
from learned_opt import _extras
from learned_opt.meta_train.eval import cache
from learned_opt.meta_train.eval import candidates as eval_optimizers
from learned_opt.meta_train.eval import metrics as M
from learned_opt.meta_train.inner import loop
from learned_opt.tasks.suites import SuiteTask, get_suite

RESULTS_FILE = "results.json"
RESULTS_FORMAT = 1
# The reference of speedups and summaries: the first of these that was evaluated (tuned,
# scheduled AdamW is what practitioners run; constant-rate Adam otherwise).
REFERENCES = ("adamw_cosine", "adam")
REFERENCE = "adam"  # the fallback, kept for callers that name it
CURVE_POINTS = 200
# The shared grid loop and its trace counter (tests assert no recompilation).
run_grid, seed_keys, TRACE_COUNT = loop.run_grid, loop.seed_keys, loop.TRACE_COUNT


def _best_index(final_train: np.ndarray) -> int:
  mean = np.mean(np.where(np.isfinite(final_train), final_train, np.inf), axis=1)
  return int(np.argmin(mean))


def _train_candidate(task, cand, keys, *, num_steps: int, full_batch: bool,
                     tune_seeds: Optional[int]):
  """(grid, grid final train [G, tuning seeds], best index, losses [S, T], final train [S],
  final test [S]) of one candidate: its grid on the tuning seeds, then its best value on
  the remaining seeds (all seeds tune when `tune_seeds` is None)."""
  grid = cand.grid or (0.0,)
  run = lambda hs, ks: jax.device_get(run_grid(
      task, jnp.asarray(hs, jnp.float32), ks, cand.aux, make=cand.make, num_steps=num_steps,
      full_batch=full_batch, eval_params=cand.eval_params))
  n_tune = keys.shape[0] if tune_seeds is None or len(grid) == 1 else min(tune_seeds, keys.shape[0])
  losses, final_train, final_test = run(grid, keys[:n_tune])
  best = _best_index(final_train)
  grid_final = final_train
  losses, final_train, final_test = losses[best], final_train[best], final_test[best]
  if n_tune < keys.shape[0]:  # the chosen value on the seeds that did not choose it
    more = run((grid[best],), keys[n_tune:])
    losses, final_train, final_test = (np.concatenate([x, y[0]]) for x, y in
                                       zip((losses, final_train, final_test), more))
  return grid, grid_final, best, losses, final_train, final_test


def evaluate_candidate(task, cand, keys, *, num_steps: int, full_batch: bool,
                       curve_points: int = CURVE_POINTS, tune_seeds: Optional[int] = None) -> dict:
  """One candidate on one task: its JSON-able result (see `evaluate_task`)."""
  start = time.perf_counter()
  grid, grid_final, best, losses, final_train, final_test = _train_candidate(
      task, cand, keys, num_steps=num_steps, full_batch=full_batch, tune_seeds=tune_seeds)
  wall = time.perf_counter() - start
  curves = np.asarray(losses, np.float64)
  steps, curve = M.downsample(curves.mean(axis=0), curve_points)
  res = {
      "kind": cand.kind,
      "lr": float(grid[best]) if cand.grid else None,
      "grid": ({"lr": list(grid), "final_train_loss": M.jsonable(np.mean(grid_final, axis=1)),
                "tuning_seeds": int(grid_final.shape[1])} if cand.grid else None),
      "final_train_loss": M.finite_or_none(np.mean(final_train)),
      "final_train_loss_per_seed": M.jsonable(final_train),
      "test_loss": M.finite_or_none(np.mean(final_test)),
      "test_loss_per_seed": M.jsonable(final_test),
      "initial_loss": M.finite_or_none(np.mean(curves[:, 0])),
      "diverged": M.diverged(curves, final_train),
      "curve_steps": steps,
      "curve": curve,
      "curves_per_seed": [M.downsample(c, curve_points)[1] for c in curves],
      "wall_s": wall,
      "fingerprint": cand.fingerprint,
  }
  if full_batch:
    inc = M.max_relative_increase(curves)
    res["max_relative_increase"] = M.finite_or_none(inc)
    res["monotone"] = M.is_monotone(curves)
  return res


def cache_keyed_on(task_fp: str, cand, *, seeds: int, first_seed: int, curve_points: int,
                   tune_seeds: Optional[int]) -> dict:
  """What a cached baseline result depends on (see `cache.py`)."""
  return {"task": task_fp, "optimizer": cache.candidate_fingerprint(cand),
          "grid": list(cand.grid), "seeds": seeds, "first_seed": first_seed,
          "curve_points": curve_points, "tune_seeds": tune_seeds, "eval_batches": loop.EVAL_BATCHES,
          "results_format": RESULTS_FORMAT}


def evaluate_task(suite_task: SuiteTask, candidates: Sequence[eval_optimizers.Candidate], *,
                  seeds: int = 3, first_seed: int = 0, data_dir: Optional[str] = None,
                  curve_points: int = CURVE_POINTS, on_candidate=None,
                  tune_seeds: Optional[int] = None,
                  result_cache: Optional[cache.ResultCache] = None) -> dict:
  """Trains one suite task with every candidate; returns its JSON-able result.

  Args:
    suite_task: the task, its step budget and batch mode.
    candidates: optimizers to compare (see `reference_of` for the speedups' reference).
    seeds: number of seeds (initializations and batch orders), the same for all.
    first_seed: seed of the first run.
    data_dir: local dataset root (default: $LOPT_DATA_DIR).
    curve_points: loss-curve points kept per optimizer in the result.
    on_candidate: optional callback(candidate_name) after each candidate (progress).
    tune_seeds: tuned candidates choose their learning rate on the first `tune_seeds`
      seeds and run the chosen one on the others (None: every seed runs the whole grid).
    result_cache: where baselines' results are looked up and stored (learned
      optimizers are never cached here; a run folder resumes them).

  Returns:
    {"num_steps", "full_batch", "description", "data", "optimizers": {name: {...}}}.
  """
  family = suite_task.build(data_dir)
  task = family.task()
  keys = seed_keys(seeds, first_seed)
  T, fb = suite_task.num_steps, suite_task.full_batch
  task_fp = cache.task_fingerprint(suite_task, family) if result_cache is not None else None
  results = {}
  for cand in candidates:
    cached = keyed_on = None
    if result_cache is not None and cand.kind != "learned":
      keyed_on = cache_keyed_on(task_fp, cand, seeds=seeds, first_seed=first_seed,
                                curve_points=curve_points, tune_seeds=tune_seeds)
      cached = result_cache.get(suite_task.name, cand.name, keyed_on)
    if cached is not None:
      results[cand.name] = {**cached, "cached": True}
    else:
      results[cand.name] = M.jsonable(evaluate_candidate(
          task, cand, keys, num_steps=T, full_batch=fb, curve_points=curve_points,
          tune_seeds=tune_seeds))
      if keyed_on is not None:
        result_cache.put(suite_task.name, cand.name, keyed_on, results[cand.name])
    if on_candidate is not None:
      on_candidate(cand.name)
  return add_speedups({"num_steps": T, "full_batch": fb, "description": suite_task.description,
                       "data": suite_task.data, "optimizers": results})


def reference_of(names: Sequence[str]) -> str:
  """The speedups' reference among `names`: the first of `REFERENCES` present."""
  return next((r for r in REFERENCES if r in names), REFERENCE)


def add_speedups(task_result: dict, reference: Optional[str] = None) -> dict:
  """Adds (or refreshes) every optimizer's speedup against the reference, if it was run:
  from the seed-mean curves (`speedup`) and per seed (`speedup_per_seed`, each seed's
  curve against the reference's curve of the same seed)."""
  opts = task_result["optimizers"]
  reference = reference or reference_of(list(opts))
  if reference in opts:
    curves = {n: (r["curve_steps"], r["curve"]) for n, r in opts.items()}
    speed = M.speedups(curves, reference=reference, num_steps=task_result["num_steps"],
                       full_batch=task_result["full_batch"])
    for name, s in speed.items():
      opts[name].update(s)
    per_seed = {n: r.get("curves_per_seed") for n, r in opts.items()}
    ref_seeds = per_seed[reference]
    for name, seeds in per_seed.items():
      if not seeds or not ref_seeds or len(seeds) != len(ref_seeds):
        continue
      steps = opts[name]["curve_steps"]
      opts[name]["speedup_per_seed"] = [M.speedups(
          {name: (steps, mine), "__ref__": (opts[reference]["curve_steps"], ref)},
          reference="__ref__", num_steps=task_result["num_steps"],
          full_batch=task_result["full_batch"])[name]["speedup_bound"]
          for mine, ref in zip(seeds, ref_seeds)]
  return task_result


# ---- suites ------------------------------------------------------------------------------
def _write_json(path: str, data: dict) -> None:
  write_atomic(path, json.dumps(data, indent=1, allow_nan=False))


def load_results(run_dir: str) -> dict:
  path = os.path.join(run_dir, RESULTS_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{run_dir!r} holds no {RESULTS_FILE}: expected the folder written by "
                     "`lopt eval --out`")
  with open(path) as f:
    return json.load(f)


def exit_with_parent(parent_pid: int, *, poll_s: float = 1.0) -> None:
  """Makes this worker process exit when `parent_pid` is no longer its parent.

  A pool's workers outlive a killed `lopt eval` (SIGTERM, SIGKILL) until their current
  task ends, which on a full suite is many minutes of CPU spent on results nobody reads,
  and cache entries written by code that may since have changed.
  """
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(poll_s)
    os._exit(1)
  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _task_worker(job: str) -> str:
  """Evaluates one task in a worker process; JSON in, JSON out (no pickled objects)."""
  job = json.loads(job)
  cands = [eval_optimizers.resolve(n, lr_grid=tuple(job["lr_grid"])) for n in job["optimizers"]]
  suite_task = get_suite(job["suite"], job["data_dir"])[job["task"]]
  result_cache = cache.ResultCache(job["cache_dir"]) if job.get("cache_dir") else None
  return json.dumps(M.jsonable(evaluate_task(
      suite_task, cands, seeds=job["seeds"], first_seed=job["first_seed"],
      data_dir=job["data_dir"], tune_seeds=job["tune_seeds"], result_cache=result_cache,
      on_candidate=_log_candidate(job["task"]) if job.get("log") else None)) | {"task": job["task"]},
      allow_nan=False)


def _log_candidate(task: str):
  """`on_candidate` that prints one line per finished optimizer (a long evaluation run
  without a progress bar, e.g. in the background, shows where it is)."""
  start = [time.perf_counter()]

  def log(name):
    now = time.perf_counter()
    print(f"eval {task}: {name} done ({(now - start[0]) / 60:.1f} min)", file=sys.stderr,
          flush=True)
    start[0] = now
  return log


def work_units(todo: dict[str, list]) -> list[tuple[str, Any]]:
  """The parallel work units of `evaluate_suite`: one per (task, optimizer), tasks in
  the suite's order. A unit per task would leave workers idle behind the one task
  whose optimizers are still running (a suite's transformer is most of its time);
  per-optimizer results merge into their task as they arrive, and a killed run
  resumes with the units it had not finished."""
  return [(name, cand) for name, missing in todo.items() for cand in missing]


def _reusable(old: dict, new: dict, specs: dict, candidates) -> dict:
  """Per-task optimizer results of a previous evaluation that this one can keep."""
  if any(old.get(k) != new[k] for k in ("format", "suite", "seeds", "first_seed", "lr_grid",
                                        "tune_seeds")):
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
                   resume: bool = True, tune_seeds: Optional[int] = None,
                   cache_dir: Optional[str] = None) -> dict:
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
    workers: (task, optimizer) pairs evaluated in parallel by this many local processes
      (1: in-process; see `work_units`).
    ray_address: evaluate tasks on a Ray cluster ("auto" or an address) instead.
    progress: show a progress bar.
    resume: keep the (task, optimizer) results already in `out_dir/results.json` from
      a run with the same suite, seeds and grid (and the same checkpoint for learned
      optimizers): only missing ones run, so optimizers can be added later, and results
      of optimizers not named this time are kept.
    tune_seeds: tuned optimizers choose their learning rate on this many seeds, then run
      it on the rest (None: the whole grid on every seed).
    cache_dir: a `cache.ResultCache` folder for the baselines' results (e.g. the
      committed `reports/cache`): those found there are not re-run.
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
             "reference": reference_of([c.name for c in candidates]), "tune_seeds": tune_seeds,
             "lopt_version": learned_opt.__version__, "tasks": {}}
  reference = results["reference"]
  result_cache = cache.ResultCache(cache_dir) if cache_dir else None
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
    results["tasks"][name] = M.jsonable(add_speedups(result, reference))
    results["tasks"] = {n: results["tasks"][n] for n in [*specs, *results["tasks"]]
                        if n in results["tasks"]}  # the suite's order, whatever finished first
    results["summary"] = M.summarize(results["tasks"], reference=reference)
    _write_json(path, results)

  start = time.perf_counter()
  try:
    if workers <= 1 and ray_address is None:
      for name, missing in todo.items():
        if bar is not None:
          bar.set_postfix(task=name)
        on_candidate = (lambda _: bar.update(1)) if bar is not None else _log_candidate(name)
        done(name, evaluate_task(specs[name], missing, seeds=seeds, first_seed=first_seed,
                                 data_dir=data_dir, on_candidate=on_candidate,
                                 tune_seeds=tune_seeds, result_cache=result_cache))
    else:
      by_name = dict(zip([c.name for c in candidates], optimizers))
      jobs = [json.dumps({"suite": suite, "task": n, "lr_grid": list(lr_grid), "seeds": seeds,
                          "optimizers": [by_name[c.name]], "first_seed": first_seed,
                          "data_dir": data_dir, "tune_seeds": tune_seeds,
                          "cache_dir": cache_dir, "log": not progress})
              for n, c in work_units(todo)]
      if ray_address is not None:
        ray_mp = _extras.require("ray.util.multiprocessing", purpose="lopt eval --ray")
        pool = ray_mp.Pool(processes=workers if workers > 1 else None, ray_address=ray_address)
        outputs = pool.imap_unordered(_task_worker, jobs)
      else:
        # spawn: a forked JAX process can deadlock.
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=exit_with_parent, initargs=(os.getpid(),))
        outputs = (f.result() for f in concurrent.futures.as_completed(
            [pool.submit(_task_worker, job) for job in jobs]))
      try:
        # Each (task, optimizer) result is merged into its task and written as soon as
        # it finishes, whichever finishes first.
        for out in outputs:
          result = json.loads(out)
          done(result["task"], {k: v for k, v in result.items() if k != "task"})
          if bar is not None:
            bar.update(len(result["optimizers"]))
      finally:
        pool.close() if ray_address is not None else pool.shutdown()
  finally:
    if bar is not None:
      bar.close()
  results["wall_s"] = time.perf_counter() - start
  results["summary"] = M.summarize(results["tasks"], reference=reference)
  _write_json(path, results)
  return results
