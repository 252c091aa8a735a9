"""Ray pool scaling: throughput in-process vs Ray workers, and Ray's per-step overhead.

Part 1 (default config, configs/tiny.yaml): inner steps per second of meta-training
in-process (`MetaTrainer`) and with `RayMetaTrainer` on 1 and 2 workers, measured in
interleaved blocks (A B C A B C ...) so that load from other processes hits all modes
alike; the median block is reported with its ratio to in-process. Every process runs
one XLA thread (this script sets the same flags the workers get), so the ratio of
Ray-1-worker to in-process is the cost of Ray alone. Also the per-step Ray overhead
(step wall time minus the worker's compute) as a share of the step.

Part 2 (overhead vs meta-parameter size): an estimator that does no inner training,
only returns a meta-gradient of theta's size, so each step is pure transfer: theta
broadcast with `ray.put`, one estimate per shard gathered, combined and applied. For
sizes 10 KB .. 10 MB, per-step ms of Ray (per-shard estimates, and combined on the
workers) next to the same step in-process; the difference is Ray's broadcast+gather.
Part 3 fits the paper model of docs/ray.md to these numbers and prints its throughput
prediction up to 1,000 workers.

Part 4 (`--recovery`, alone): what exact recovery of a lost worker costs
(distributed/recovery.py). Per step: 1 worker, interleaved blocks with a snapshot of
the pools after every run against none (the default takes one per 100 runs, or none
when checkpoints come as often). Per failure: a step whose worker was killed (kill -9)
before it, after k runs since the last snapshot: Ray's restart plus the replay.

Usage: python benchmarks/ray_scaling.py [--config tiny] [--steps 5] [--repeats 3]
         [--sizes-kb 10 100 1000 10000] [--json OUT] [--recovery]
"""
from __future__ import annotations

import os

# Before JAX starts: one thread here as in the workers (see distributed.pool.SINGLE_THREAD_ENV).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse
import json
import signal
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ray

from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.cli.meta import resolve_config_path
from learned_opt.meta_train.estimators.base import COUNT_NAMES, GradEstimate
from learned_opt.meta_train.learner.trainer import MetaTrainer
from learned_opt.meta_train.distributed.pool import SINGLE_THREAD_ENV, RayMetaTrainer, connect


# ---- part 1 ------------------------------------------------------------------------------
def _time_steps(trainer, seed, carry, steps):
  """Runs `steps` outer steps; returns per-step wall times, the carry and metrics.

  A prefetching Ray trainer does not prefetch after the block's last step: its workers
  would otherwise compute the next block's first step while other modes are timed.
  """
  learner, states = carry
  walls, metrics = [], []
  prefetch = getattr(trainer, "prefetch", False)
  try:
    for i in range(steps):
      if prefetch and i == steps - 1:
        trainer.prefetch = False
      t0 = time.perf_counter()
      learner, states, m = trainer.step(seed, learner, states)
      jax.block_until_ready(learner.meta_params)
      walls.append(time.perf_counter() - t0)
      metrics.append(m)
  finally:
    if prefetch:
      trainer.prefetch = True
  return walls, (learner, states), jax.device_get(metrics)


class InProcessInActor:
  """`MetaTrainer` running inside a Ray worker process: the in-process run under the
  same OS scheduling as the workers (Ray's processes live in their own session, which
  Linux's autogroup scheduler gives its own CPU share on a busy machine)."""

  def __init__(self, cfg_dict: dict):
    cfg = config_lib.config_from_dict(cfg_dict)
    lopt = config_lib.build_lopt(cfg.lopt)
    self.trainer = MetaTrainer(config_lib.build_estimators(cfg, lopt),
                               config_lib.build_outer_optimizer(cfg.outer), accumulate=cfg.outer.accumulate)
    self.seed = cfg.seed
    self.carry = self.trainer.init(cfg.seed)
    _, self.carry, _ = _time_steps(self.trainer, self.seed, self.carry, 2)

  def run(self, steps: int) -> list:
    walls, self.carry, _ = _time_steps(self.trainer, self.seed, self.carry, steps)
    return walls


def throughput(cfg, *, steps: int, repeats: int, cache_dir: str) -> dict:
  lopt = config_lib.build_lopt(cfg.lopt)
  est = config_lib.build_estimators(cfg, lopt)
  opt = config_lib.build_outer_optimizer(cfg.outer)
  trainers = {"in-process": MetaTrainer(est, opt, accumulate=cfg.outer.accumulate)}
  for name, w, prefetch, graph in (("ray 1 worker", 1, True, True),
                                   ("ray 1 worker, actor calls", 1, True, False),
                                   ("ray 1 worker, no prefetch", 1, False, True),
                                   ("ray 2 workers", 2, True, True),
                                   ("ray 2 workers, actor calls", 2, True, False)):
    trainers[name] = RayMetaTrainer(est, opt, accumulate=cfg.outer.accumulate, num_workers=w,
                                    cpus_per_worker=0.25, compilation_cache_dir=cache_dir,
                                    prefetch=prefetch, compiled_graph=graph)
  # Ray CPUs are scheduling tokens here (every process runs one XLA thread): 0.25 each
  # lets the 4 worker actors and this one fit on the 2 CPUs of the local Ray.
  in_actor = ray.remote(InProcessInActor).options(
      num_cpus=0.25, runtime_env={"env_vars": SINGLE_THREAD_ENV}).remote(config_lib.config_to_dict(cfg))
  carries = {}
  for name, tr in trainers.items():     # compile and warm up
    carries[name] = tr.init(cfg.seed)
    _, carries[name], _ = _time_steps(tr, cfg.seed, carries[name], 2)
  rates = {name: [] for name in list(trainers) + ["in-process, in an actor"]}
  # Per block of 1-worker steps: Ray's broadcast + gather per step (wall - worker compute,
  # ms), its share of the wall, and the learner's update (ms). Per block, not per step:
  # with prefetch a step's call starts inside the previous step.
  overhead = {"ray 1 worker": [], "ray 1 worker, actor calls": [], "ray 1 worker, no prefetch": []}
  per_step = trainers["in-process"].inner_steps_per_outer_step
  for _ in range(repeats):
    for name, tr in trainers.items():
      walls, carries[name], ms = _time_steps(tr, cfg.seed, carries[name], steps)
      rates[name].append(steps * per_step / sum(walls))
      if name in overhead:
        compute = sum(m["worker_compute_s"] for m in ms)
        overhead[name].append(((sum(walls) - compute) / steps, 1 - compute / sum(walls),
                               statistics.median(m["learner_s"] for m in ms),
                               statistics.median(m["transit_to_s"] for m in ms),
                               statistics.median(m["transit_back_s"] for m in ms)))
    rates["in-process, in an actor"].append(steps * per_step / sum(ray.get(in_actor.run.remote(steps))))
  ray.kill(in_actor)
  for tr in trainers.values():
    if hasattr(tr, "close"):
      tr.close()
  out = {}
  for name, r in rates.items():
    out[name] = {"median": statistics.median(r), "best": max(r),
                 "ratio_median": statistics.median(r) / statistics.median(rates["in-process"]),
                 "ratio_best": max(r) / max(rates["in-process"]),
                 "ratio_median_vs_actor": statistics.median(r) / statistics.median(rates["in-process, in an actor"]),
                 "ratio_best_vs_actor": max(r) / max(rates["in-process, in an actor"])}
  for name, o in overhead.items():
    out[name].update(overhead_ms_median=1e3 * statistics.median(x[0] for x in o),
                     overhead_ms_min=1e3 * min(x[0] for x in o),
                     overhead_share_median=statistics.median(x[1] for x in o),
                     overhead_share_min=min(x[1] for x in o),
                     learner_ms_median=1e3 * statistics.median(x[2] for x in o),
                     transit_to_ms_median=1e3 * statistics.median(x[3] for x in o),
                     transit_back_ms_median=1e3 * statistics.median(x[4] for x in o))
  out["step_s"] = trainers["in-process"].inner_steps_per_outer_step / statistics.median(rates["in-process"])
  return out


def call_cost_ms(calls: int = 200) -> float:
  """Learner time per actor call when calls are pipelined over 2 idle actors (an upper
  bound on what each extra worker costs the learner per step)."""
  tr = RayMetaTrainer([EchoEstimator(16, 2)], optax.sgd(1e-3), num_workers=2, cpus_per_worker=0.5, compilation_cache_dir=None)
  actors = [s.actor for s in tr.scheduler.slots]
  ray.get([a.pid.remote() for a in actors])
  t0 = time.perf_counter()
  ray.get([actors[i % 2].pid.remote() for i in range(calls)])
  cost = 1e3 * (time.perf_counter() - t0) / calls
  tr.close()
  return cost


# ---- part 2 ------------------------------------------------------------------------------
class EchoLOpt:
  """Meta-parameters of a given size (float32), nothing else."""

  def __init__(self, num_floats: int):
    self.num_floats = num_floats

  def init_meta_params(self, key):
    return {"w": jax.random.normal(key, (self.num_floats,), jnp.float32)}


class EchoEstimator:
  """The estimator interface without inner training: one theta-sized meta-gradient,
  computed with numpy so that the worker's own time is ~0 and a step is pure transfer."""
  unroll_length = 1

  def __init__(self, num_floats: int, num_tasks: int):
    self.lopt = EchoLOpt(num_floats)
    self.num_tasks = num_tasks

  def init(self, key, meta_params, *, indices=None):
    return np.arange(self.num_tasks, dtype=np.int32) if indices is None else np.asarray(indices)

  def estimate(self, key, meta_params, state):
    zero = np.zeros((), np.int32)
    return state, GradEstimate(grad={k: 1e-3 * np.asarray(x) for k, x in meta_params.items()},
                               meta_loss=np.zeros((), np.float32),
                               num_pairs=np.asarray(state.shape[0], np.int32),
                               counts={k: zero for k in COUNT_NAMES})


def transfer_overhead(sizes_kb, *, steps: int, num_tasks: int, workers: int, opt) -> list[dict]:
  rows = []
  for kb in sizes_kb:
    est = [EchoEstimator(int(kb * 1000 / 4), num_tasks)]
    row = {"size_kb": kb}
    modes = {"in-process": lambda: MetaTrainer(est, opt),
             "ray per-shard": lambda: RayMetaTrainer(est, opt, num_workers=workers,
                                                     cpus_per_worker=0.5, compilation_cache_dir=None),
             "ray combined": lambda: RayMetaTrainer(est, opt, num_workers=workers, cpus_per_worker=0.5,
                                                    compilation_cache_dir=None, combine_on_worker=True)}
    for name, make in modes.items():
      tr = make()
      carry = tr.init(0)
      _, carry, _ = _time_steps(tr, 0, carry, 2)
      walls, carry, ms = _time_steps(tr, 0, carry, steps)
      row[name + " ms"] = 1e3 * statistics.median(walls)
      if name != "in-process":
        row[name + " broadcast ms"] = 1e3 * statistics.median(m["broadcast_s"] for m in ms)
      if hasattr(tr, "close"):
        tr.close()
    rows.append(row)
  return rows


# ---- part 4 ------------------------------------------------------------------------------
def recovery_cost(cfg, *, steps: int, repeats: int, cache_dir: str, replays=(1, 10, 50)) -> dict:
  """Per-step cost of snapshots (every run vs never), and the wall time of a step that
  restores a killed worker after k runs since its last snapshot."""
  lopt = config_lib.build_lopt(cfg.lopt)
  est = config_lib.build_estimators(cfg, lopt)
  opt = config_lib.build_outer_optimizer(cfg.outer)
  make = lambda every, **kw: RayMetaTrainer(est, opt, accumulate=cfg.outer.accumulate, num_workers=1,
                                            cpus_per_worker=0.25, compilation_cache_dir=cache_dir,
                                            snapshot_every=every, **kw)
  trainers = {"snapshot every run": make(1), "no snapshot": make(10**9)}
  carries = {name: tr.init(cfg.seed) for name, tr in trainers.items()}
  walls = {name: [] for name in trainers}
  for name, tr in trainers.items():
    _, carries[name], _ = _time_steps(tr, cfg.seed, carries[name], 2)
  for _ in range(repeats):
    for name, tr in trainers.items():
      w, carries[name], _ = _time_steps(tr, cfg.seed, carries[name], steps)
      walls[name] += w
  for tr in trainers.values():
    tr.close()
  out = {name: 1e3 * statistics.median(w) for name, w in walls.items()}
  tr = make(10**9, prefetch=False)
  out["restore"] = []
  for k in replays:
    carry = tr.init(cfg.seed)
    _, carry, _ = _time_steps(tr, cfg.seed, carry, k)
    actor = tr.scheduler.slots[0].actor
    pid = ray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    walls_k, carry, ms = _time_steps(tr, cfg.seed, carry, 2)
    out["restore"].append({"runs_replayed": int(ms[0]["runs_replayed"]), "step_ms": 1e3 * walls_k[0],
                           "worker_ms": 1e3 * float(ms[0]["worker_compute_s"]),
                           "next_step_ms": 1e3 * walls_k[1]})
  tr.close()
  return out


# ---- part 3 ------------------------------------------------------------------------------
def fit_model(rows, *, num_tasks: int, workers: int, call_ms: float) -> dict:
  """Per-step Ray overhead = c0 + W * r + S * (beta + W * gamma), S in MB, W workers.

  r: learner time per worker call (measured with pipelined no-op calls); c0: the rest
  of the fixed cost, from the smallest size; beta: the broadcast's cost per MB (the
  `ray.put` time at the largest size); gamma: learner ingest (receive, deserialize,
  combine) per MB per estimate, from the two gather widths at the largest size
  (`num_tasks` per-shard estimates vs `workers` combined ones).
  """
  small, large = rows[0], rows[-1]
  ovh = lambda r, mode: r[f"ray {mode} ms"] - r["in-process ms"]
  s = large["size_kb"] / 1000
  gamma = max(0.0, (ovh(large, "per-shard") - ovh(large, "combined")) / ((num_tasks - workers) * s))
  beta = large["ray combined broadcast ms"] / s
  c0 = max(0.0, min(ovh(small, "per-shard"), ovh(small, "combined")) - workers * call_ms)
  return {"c0_ms": c0, "r_ms": call_ms, "beta_ms_per_mb": beta, "gamma_ms_per_mb": gamma}


def predict(model, *, compute_s: float, size_mb: float, workers: int) -> float:
  """Outer steps x workers per second under weak scaling (fixed work per worker), one
  combined estimate per worker."""
  overhead_ms = (model["c0_ms"] + workers * model["r_ms"]
                 + size_mb * (model["beta_ms_per_mb"] + workers * model["gamma_ms_per_mb"]))
  return workers / (compute_s + 1e-3 * overhead_ms)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="tiny")
  p.add_argument("--steps", type=int, default=5, help="outer steps per timed block")
  p.add_argument("--repeats", type=int, default=3, help="interleaved blocks per mode")
  p.add_argument("--sizes-kb", type=float, nargs="+", default=[10, 100, 1000, 10000])
  p.add_argument("--echo-tasks", type=int, default=8, help="shards of the transfer test")
  p.add_argument("--cache-dir", default="/tmp/lopt_ray_bench_cache")
  p.add_argument("--compute-ms", type=float, default=None,
                 help="skip part 1 and use this per-step compute time in the model")
  p.add_argument("--json", default=None)
  p.add_argument("--recovery", action="store_true", help="run part 4 only")
  args = p.parse_args()
  cfg = config_lib.load_config(resolve_config_path(args.config))
  connect(num_cpus=2)   # local Ray, workers at the learner's priority
  load = [os.getloadavg()]
  if args.recovery:
    try:
      rc = recovery_cost(cfg, steps=args.steps, repeats=args.repeats, cache_dir=args.cache_dir)
    finally:
      ray.shutdown()
    print(f"\n== exact recovery, config {cfg.name}, 1 worker ({args.repeats} interleaved blocks of "
          f"{args.steps} steps) ==")
    snap = rc["snapshot every run"] - rc["no snapshot"]
    print(f"step, median: {rc['no snapshot']:.1f} ms without snapshots, {rc['snapshot every run']:.1f} ms "
          f"with one per run: {snap:.2f} ms per snapshot, {snap / 100:.3f} ms per step at the default "
          "snapshot_every=100")
    for r in rc["restore"]:
      print(f"kill -9, then a step replaying {r['runs_replayed']:>3} runs: {r['step_ms']:>7.0f} ms "
            f"(worker {r['worker_ms']:.0f} ms); next step {r['next_step_ms']:.0f} ms")
    load.append(os.getloadavg())
    print(f"load average at start {load[0]}, at end {load[1]} on {os.cpu_count()} cores")
    return 0
  try:
    tp = None
    if args.compute_ms is None:
      tp = throughput(cfg, steps=args.steps, repeats=args.repeats, cache_dir=args.cache_dir)
      print(f"\n== throughput, config {cfg.name} ({args.repeats} interleaved blocks of {args.steps} "
            "outer steps; one XLA thread per process) ==")
      print(f"{'mode':<27}{'median steps/s':>13}{'vs in-process':>15}{'vs in actor':>13}"
            f"{'best steps/s':>14}{'vs in-process':>15}{'vs in actor':>13}")
      for name in ("in-process", "in-process, in an actor", "ray 1 worker",
                   "ray 1 worker, actor calls", "ray 1 worker, no prefetch", "ray 2 workers",
                   "ray 2 workers, actor calls"):
        r = tp[name]
        print(f"{name:<27}{r['median']:>13,.0f}{r['ratio_median']:>15.1%}{r['ratio_median_vs_actor']:>13.1%}"
              f"{r['best']:>14,.0f}{r['ratio_best']:>15.1%}{r['ratio_best_vs_actor']:>13.1%}")
      print(f"outer step in-process: {1e3 * tp['step_s']:.0f} ms (median). Ray's broadcast + gather "
            "per step, 1 worker ((block wall - worker compute) / steps; median and best block):")
      for name in ("ray 1 worker", "ray 1 worker, actor calls", "ray 1 worker, no prefetch"):
        r = tp[name]
        print(f"  {name:<27} median {r['overhead_ms_median']:.1f} ms = {r['overhead_share_median']:.1%} "
              f"of the step, best {r['overhead_ms_min']:.1f} ms = {r['overhead_share_min']:.1%}; "
              f"of which learner update {r['learner_ms_median']:.2f} ms, call transit to the "
              f"worker {r['transit_to_ms_median']:.2f} ms and back {r['transit_back_ms_median']:.2f} ms")

    rows = transfer_overhead(args.sizes_kb, steps=args.steps, num_tasks=args.echo_tasks, workers=2,
                             opt=config_lib.build_outer_optimizer(cfg.outer))
    print(f"\n== per-step cost vs meta-parameter size (no inner training; {args.echo_tasks} shards, "
          "2 workers; ms, median) ==")
    print(f"{'size':>9}{'in-process':>12}{'ray/shard':>11}{'ray/worker':>12}{'broadcast':>11}"
          f"{'overhead/shard':>16}{'overhead/worker':>17}")
    for r in rows:
      print(f"{r['size_kb']:>7.0f}KB{r['in-process ms']:>12.1f}{r['ray per-shard ms']:>11.1f}"
            f"{r['ray combined ms']:>12.1f}{r['ray combined broadcast ms']:>11.2f}"
            f"{r['ray per-shard ms'] - r['in-process ms']:>16.1f}"
            f"{r['ray combined ms'] - r['in-process ms']:>17.1f}")

    call_ms = call_cost_ms()
    model = fit_model(rows, num_tasks=args.echo_tasks, workers=2, call_ms=call_ms)
    print("\n== paper model (docs/ray.md), fitted: overhead = c0 + W*r + S*(beta + W*gamma) ==")
    print(", ".join(f"{k} = {v:.3g}" for k, v in model.items()))
    compute_s = tp["step_s"] if tp else 1e-3 * args.compute_ms
    print(f"weak scaling, {1e3 * compute_s:.0f} ms of compute per worker per step (the config's "
          "step): outer steps x workers / s; learner-bound from W* = compute / (r + S*gamma)")
    sizes = (0.003, 1.0, 10.0)
    print(f"{'workers':>8}" + "".join(f"{f'S={s:g}MB':>12}" for s in sizes))
    for w in (1, 10, 100, 300, 1000):
      print(f"{w:>8}" + "".join(f"{predict(model, compute_s=compute_s, size_mb=s, workers=w):>12.1f}"
                                for s in sizes))
    print(f"{'W*':>8}" + "".join(f"{1e3 * compute_s / (model['r_ms'] + s * model['gamma_ms_per_mb']):>12.0f}"
                                 for s in sizes))
  finally:
    ray.shutdown()
  load.append(os.getloadavg())
  print(f"\nload average (1, 5, 15 min) at start {load[0]}, at end {load[1]} on {os.cpu_count()} cores")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"throughput": tp, "transfer": rows, "model": model, "load": load}, f, indent=1)
  return 0


if __name__ == "__main__":
  main()
