"""Meta-training throughput: inner steps per second of a PES estimate, side by side.

For each population size (tasks; each runs an antithetic pair) and population layout
(`vmap`, `lax.map`, `lax.map` vectorizing the two members of a chunk), prints:
  - inner steps/s = tasks x 2 x unroll_length / wall time of one estimate;
  - the learned optimizer's share of that time (1 - time with a learned *step size*
    instead of the learned optimizer, same tasks and layout);
  - the FLOP-bound rate: this machine's dense f32 matmul FLOP/s (measured in this run)
    divided by the FLOPs of one inner step (model loss+grad and optimizer update, from
    XLA's cost analysis), and the measured rate as a percentage of it;
  - the same percentage for the estimate with a learned step size in place of the
    learned optimizer, against the model's FLOPs alone: how close the model's own
    matmuls come to the dense rate, i.e. the ceiling for any optimizer on this device.

Usage: python benchmarks/meta_train.py [--family mlp_synthetic] [--populations 8 16 32 64]
         [--layouts vmap map map2] [--unroll 10] [--repeats 2] [--json OUT]
         [--lopt per_param_mlp|hierarchical] [--hidden 32 32]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

import learned_opt
from learned_opt import tasks
from learned_opt.meta_train.inner import unroll
from learned_opt.meta_train.estimators.pes import PES
from learned_opt.meta_train.estimators.truncation import ConstantTruncation

LAYOUTS = {"vmap": ("vmap", None), "map": ("map", None), "map2": ("map", 2)}


def matmul_flops_per_s(sizes=(1024, 2048), repeats: int = 5) -> float:
  """Dense f32 matmul rate of this machine: best over sizes and `repeats` runs.

  Called before and after the throughput runs; the best value is the peak, so a busy
  machine lowers the measured fractions rather than inflating them.
  """
  rate = 0.0
  f = jax.jit(lambda x: x @ x)
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n))
    jax.block_until_ready(f(a))
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a))
      rate = max(rate, 2 * n**3 / (time.perf_counter() - t0))
  return rate


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def step_flops(family, lopt, theta) -> tuple[float, float]:
  """(model FLOPs, optimizer FLOPs) of one inner step of the family's default task."""
  task = family.task()
  params = task.init(jax.random.key(0))
  state = lopt.init(theta, params, num_steps=100)
  batch = task.batch(jax.random.key(1))
  grads = jax.grad(task.loss)(params, jax.random.key(1), batch)
  model = _flops(lambda p: jax.value_and_grad(task.loss)(p, jax.random.key(1), batch), params)
  opt = _flops(lambda t, g, s, p: lopt.update(t, g, s, p, loss=jnp.float32(1.0), key=jax.random.key(2)),
               theta, grads, state, params)
  return model, opt


def estimate_time(family, lopt, theta, num_tasks, layout, unroll_length, repeats) -> float:
  mode, batch_size = LAYOUTS[layout]
  est = PES(family=family, lopt=lopt, schedule=ConstantTruncation(horizon=10 * unroll_length),
            num_tasks=num_tasks, unroll_length=unroll_length, population_map=mode,
            map_batch_size=batch_size)
  state = est.init(jax.random.key(0), theta)
  state, g = est.estimate(jax.random.key(1), theta, state)  # compile
  jax.block_until_ready(g)
  best = float("inf")
  for i in range(repeats):
    t0 = time.perf_counter()
    state, g = est.estimate(jax.random.key(2 + i), theta, state)
    jax.block_until_ready(g)
    best = min(best, time.perf_counter() - t0)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="mlp_synthetic")
  parser.add_argument("--populations", type=int, nargs="+", default=[8, 16, 32, 64])
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
  parser.add_argument("--unroll", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="PerParamMLP hidden sizes")
  parser.add_argument("--lopt", choices=("per_param_mlp", "hierarchical"), default="per_param_mlp",
                      help="the learned optimizer meta-trained (hierarchical: HierarchicalLOpt's defaults)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  family = tasks.get_family(args.family)
  if args.lopt == "hierarchical":
    lopt = learned_opt.HierarchicalLOpt()
  else:
    lopt = learned_opt.PerParamMLP(hidden_sizes=tuple(args.hidden))
  theta = lopt.init_meta_params(jax.random.key(0))
  step_size = learned_opt.LearnedLR(init_lr=0.01)
  step_theta = step_size.init_meta_params(jax.random.key(0))
  peak = matmul_flops_per_s()
  model_flops, opt_flops = step_flops(family, lopt, theta)
  bound = peak / (model_flops + opt_flops)
  params = sum(x.size for x in jax.tree.leaves(family.task().init(jax.random.key(0))))
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); auto layout: "
        f"{unroll.resolve_population_map('auto')}")
  name = "HierarchicalLOpt()" if args.lopt == "hierarchical" else f"PerParamMLP{tuple(args.hidden)}"
  print(f"family {args.family} ({params} params), {name}, unroll {args.unroll}")
  print(f"dense matmul: {peak / 1e9:.1f} GFLOP/s; per inner step: model {model_flops / 1e6:.1f} MFLOP + "
        f"optimizer {opt_flops / 1e6:.1f} MFLOP -> FLOP-bound rate {bound:.0f} inner steps/s")
  print(f"{'tasks':>5} {'layout':>6} {'steps/s':>9} {'lopt share':>10} {'% of bound':>10} "
        f"{'step-size % of model bound':>27}")
  rows = []
  for n in args.populations:
    for layout in args.layouts:
      inner = n * 2 * args.unroll
      t = estimate_time(family, lopt, theta, n, layout, args.unroll, args.repeats)
      t_sgd = estimate_time(family, step_size, step_theta, n, layout, args.unroll, args.repeats)
      rate, share = inner / t, max(0.0, 1.0 - t_sgd / t)
      rows.append({"tasks": n, "layout": layout, "inner_steps_per_s": rate, "lopt_share": share,
                   "fraction_of_flop_bound": rate / bound, "step_size_steps_per_s": inner / t_sgd})
      # The same estimate with a learned step size (no optimizer network) against the
      # model's FLOPs alone: the ceiling the model's own small matmuls set on this device.
      ceiling = inner / t_sgd * model_flops / peak
      print(f"{n:>5} {layout:>6} {rate:>9.0f} {share:>10.0%} {rate / bound:>10.1%} {ceiling:>27.1%}",
            flush=True)
  peak_after = matmul_flops_per_s()
  if peak_after > peak:
    print(f"dense matmul measured again after the runs: {peak_after / 1e9:.1f} GFLOP/s; fractions "
          f"of the FLOP-bound rate with this peak: " + ", ".join(
              f"{r['tasks']}/{r['layout']} {r['inner_steps_per_s'] * (model_flops + opt_flops) / peak_after:.1%}"
              for r in rows))
    peak, bound = peak_after, peak_after / (model_flops + opt_flops)
  for n in args.populations:
    by = {r["layout"]: r["inner_steps_per_s"] for r in rows if r["tasks"] == n}
    if "vmap" in by and "map" in by:
      print(f"tasks {n}: map / vmap = {by['map'] / by['vmap']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"matmul_flops_per_s": peak, "model_flops": model_flops, "opt_flops": opt_flops,
                 "flop_bound_steps_per_s": bound, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
