"""Wall time of one training step with each learned optimizer vs optax Adam, and FLOP floors.

One step = forward + backward + optimizer update, jitted (params and optimizer state
donated), on a fixed batch. Models: a
~1M-parameter MLP (784-1024-256-10, batch 128) and the project's small transformer LM
(`TransformerLMFamily`, d=128, 2 layers, on synthetic text). All optimizers are timed
in interleaved rounds in one run, so ratios compare like with like.

FLOP floor of an optimizer = (model fwd+bwd FLOPs, counted by XLA's cost analysis of
the gradient computation, + the optimizer network's FLOPs per parameter * #params) /
this machine's dense-matmul rate (measured here, same run). `x floor` = measured step
time / floor: how far the step is from running all its FLOPs at matmul speed.

The FLOP floor counts neither memory traffic nor transcendentals (a per-parameter LSTM
evaluates 5 sigmoids/tanhs per hidden unit and coordinate; a tanh or exp costs this
CPU ~30x an elementwise multiply-add), so `roofline ms` is a second, reachable floor:
max(compute, traffic), with compute = the FLOP floor + the step's transcendentals (each
primitive's elements in the step's jaxpr / this machine's rate for it), and traffic =
the bytes a step must move at the least (parameters read and written, gradients written
and read, optimizer state read and written, once each; the model's activations are not
counted) / this machine's streaming bandwidth (the best of 4-64 MB working sets; both
rates measured here, same run). `x roof` = step time / that floor.

Every step is compiled with `learned_opt.compiler_options()` (on CPU: XLA's YNNPACK dot
fusion, which runs the per-coordinate networks as one kernel, and 512-bit vectors where
the CPU has AVX-512), as the README tells users to; `--xla-defaults` compiles with
XLA's defaults instead, for comparison.

Usage: python benchmarks/lopt_step.py [--rounds 5] [--iters 10] [--model mlp|transformer|all]
       [--optimizers per_param_mlp,hierarchical,...] [--xla-defaults] [--json OUT]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import optax

import learned_opt as lo
from learned_opt import tasks
from learned_opt.tasks import datasets


def matmul_rate(n: int) -> float:
  """Dense float32 matmul FLOP/s of this device (best of several n x n x n products)."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  b = jax.random.normal(jax.random.key(1), (n, n))
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def stream_bandwidth(sizes=(1 << 20, 1 << 22, 1 << 24)) -> float:
  """Bytes/s of a streaming read + write of n float32s, the best over working sets of
  4-64 MB: a step's state may sit in a large L3 (480 MB on this project's CPU), and the
  traffic floor must stay a floor, so it takes the fastest level measured."""
  f = jax.jit(lambda x: x * 1.5 + 1.0)
  best_rate = 0.0
  for n in sizes:
    x = jnp.ones((n,), jnp.float32)
    jax.block_until_ready(f(x))
    for _ in range(5):
      t = time.perf_counter()
      jax.block_until_ready(f(x))
      best_rate = max(best_rate, 2 * 4 * n / (time.perf_counter() - t))
  return best_rate


# The transcendental primitives a step evaluates, and how each is timed (as a chain of
# evaluations on a cache-resident array; the shifts keep values in range).
_TRANSCENDENTALS = {
    "tanh": lambda x: jnp.tanh(x) + 0.5,
    "logistic": lambda x: jax.nn.sigmoid(x) + 0.2,
    "exp": lambda x: jnp.exp(-x) + 0.5,
    "log": lambda x: jnp.log(x) + 1.5,
    "rsqrt": lambda x: jax.lax.rsqrt(x) + 0.5,
    "sqrt": lambda x: jnp.sqrt(x) + 0.1,
}


def transcendental_rates(n: int = 1 << 16, chain: int = 32) -> dict:
  """Evaluations/s of each primitive in `_TRANSCENDENTALS`, on this machine."""
  rates = {}
  for name, op in _TRANSCENDENTALS.items():
    def f(x):
      for _ in range(chain):
        x = op(x)
      return x
    f = jax.jit(f)
    x = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(5):
      t = time.perf_counter()
      for _ in range(20):
        y = f(x)
      jax.block_until_ready(y)
      best = min(best, (time.perf_counter() - t) / 20)
    rates[name] = chain * n / best
  return rates


def transcendental_counts(jitted, *args) -> dict:
  """Elements produced by each transcendental primitive in a jitted function's jaxpr
  (sub-jaxprs included): what the algorithm evaluates, before XLA duplicates anything
  into fusions."""
  counts = {}
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name in _TRANSCENDENTALS:
        counts[name] = counts.get(name, 0) + sum(v.aval.size for v in eqn.outvars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jitted.trace(*args).jaxpr.jaxpr)
  return counts


def least_step_bytes(params, state) -> int:
  """Parameters read and written, gradients written and read, optimizer state read and
  written: what any step must move through memory once."""
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                            if hasattr(x, "dtype"))
  return 4 * nbytes(params) + 2 * nbytes(state)


def network_flops_per_param(lopt) -> int:
  """Multiply-adds (x2) of the optimizer's per-parameter network; 0 for Adam."""
  if lopt is None:
    return 0
  f = len(lopt.spec.param_names())
  if isinstance(lopt, lo.PerParamMLP):
    sizes = (f,) + tuple(lopt.hidden_sizes) + (2,)
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
  if isinstance(lopt, lo.PerParamLSTM):
    h = lopt.hidden_size
    return 2 * (f * 4 * h + h * 4 * h + h * 2 + f * 2)
  if isinstance(lopt, lo.HierarchicalLOpt):
    return 2 * (f * lopt.per_param_hidden + lopt.per_param_hidden * 2)
  raise ValueError(f"unknown optimizer {lopt!r}")


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(1024)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


def mlp_problem():
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (128, 784))
  y = jax.random.randint(jax.random.key(1), (128,), 0, 10)
  params = model.init(jax.random.key(2), x)["params"]
  loss = lambda p, batch: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, batch[0]), batch[1]).mean()
  return params, loss, (x, y)


def transformer_problem():
  family = tasks.TransformerLMFamily(datasets.text_dataset("synthetic", None), model_dim=128)
  task = family.task()
  params = task.init(jax.random.key(0))
  batch = task.batch(jax.random.key(1))
  return params, (lambda p, b: task.loss(p, jax.random.key(2), b)), batch


def optimizers():
  shipped = lo.load(lo.pretrained_path("hierarchical_hd"))[0]   # the recommended one
  return {"adam": None, "per_param_mlp": lo.PerParamMLP(), "per_param_lstm": lo.PerParamLSTM(),
          "hierarchical": lo.HierarchicalLOpt(), "hierarchical_hd": shipped}


def make_step(loss_fn, lopt, options):
  if lopt is None:
    tx = optax.adam(1e-3)
  else:
    tx = lo.to_optax(lopt, lopt.init_meta_params(jax.random.key(0)), num_steps=1000)

  # Params and state are donated, as training loops do: without it XLA allocates fresh
  # output buffers every step, and their page faults cost this CPU ~1 ms per step.
  @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=options or None)
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state, loss

  return tx, step


def bench(name, problem, rates, rounds, iters, opts, options):
  params, loss_fn, batch = problem()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  model_flops = grad_fn.lower(params, batch).compile().cost_analysis()["flops"]
  rate, bandwidth, trate = rates
  runs, transcendentals, traffic = {}, {}, {}
  for opt_name, lopt in opts.items():
    tx, step = make_step(loss_fn, lopt, options)
    state = tx.init(params)
    transcendentals[opt_name] = transcendental_counts(step, params, state, batch)
    traffic[opt_name] = least_step_bytes(params, state)
    p, state, _ = step(jax.tree.map(jnp.copy, params), state, batch)  # compile
    jax.block_until_ready(p)
    runs[opt_name] = [step, p, state, []]
  for _ in range(rounds):  # interleaved: every optimizer sees the same machine load
    for opt_name, run in runs.items():
      step, p, state, times = run
      # One untimed step first: the previous optimizer's run evicted this one's
      # parameters and state from the cache (the per-parameter networks stream hundreds
      # of MB), and a training loop runs in the warm state.
      p, state, _ = step(p, state, batch)
      jax.block_until_ready(p)
      t = time.perf_counter()
      for _ in range(iters):
        p, state, loss = step(p, state, batch)
      jax.block_until_ready(p)
      times.append((time.perf_counter() - t) / iters)
      run[1], run[2] = p, state
  adam = statistics.median(runs["adam"][3])
  print(f"\n{name}: {n_params / 1e6:.2f}M params, model fwd+bwd {model_flops / 1e9:.2f} GFLOP/step")
  print(f"{'optimizer':<16}{'ms/step':>9}{'x Adam':>8}{'net FLOP/param':>16}{'floor ms':>10}"
        f"{'x floor':>9}{'transc/param':>14}{'MB moved':>10}{'roofline ms':>13}{'x roof':>8}")
  rows = []
  for opt_name, lopt in opts.items():
    t = statistics.median(runs[opt_name][3])
    per_param = network_flops_per_param(lopt)
    floor = (model_flops + per_param * n_params) / rate
    n_transc = sum(transcendentals[opt_name].values())
    compute = floor + sum(c / trate[k] for k, c in transcendentals[opt_name].items())
    roof = max(compute, traffic[opt_name] / bandwidth)
    print(f"{opt_name:<16}{1e3 * t:>9.2f}{t / adam:>8.2f}{per_param:>16d}{1e3 * floor:>10.2f}"
          f"{t / floor:>9.2f}{n_transc / n_params:>14.1f}"
          f"{traffic[opt_name] / 1e6:>10.1f}{1e3 * roof:>13.2f}{t / roof:>8.2f}")
    rows.append({"optimizer": opt_name, "ms_per_step": 1e3 * t, "x_adam": t / adam,
                 "net_flop_per_param": per_param, "floor_ms": 1e3 * floor, "x_floor": t / floor,
                 "transcendentals_per_param": n_transc / n_params,
                 "transcendentals": transcendentals[opt_name],
                 "least_bytes": traffic[opt_name], "roofline_ms": 1e3 * roof,
                 "x_roofline": t / roof})
  return {"model": name, "params": n_params, "model_gflop": model_flops / 1e9, "rows": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--model", choices=("mlp", "transformer", "all"), default="all")
  parser.add_argument("--optimizers", default="all",
                      help="comma-separated subset of: " + ",".join(optimizers()) + " (adam always runs)")
  parser.add_argument("--matmul-n", type=int, default=0, help="0: 1024 on CPU, 4096 on GPU")
  parser.add_argument("--xla-defaults", action="store_true",
                      help="compile without learned_opt.compiler_options()")
  parser.add_argument("--json", default="", help="also write the numbers to this file")
  args = parser.parse_args()
  n = args.matmul_n or (1024 if jax.default_backend() == "cpu" else 4096)
  opts = optimizers()
  if args.optimizers != "all":
    wanted = {"adam", *args.optimizers.split(",")}
    unknown = wanted - set(opts)
    if unknown:
      parser.error(f"unknown optimizers {sorted(unknown)}; choose from {sorted(opts)}")
    opts = {k: v for k, v in opts.items() if k in wanted}
  rate, bandwidth, trate = matmul_rate(n), stream_bandwidth(), transcendental_rates()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"dense f32 matmul {n}^3: {rate / 1e9:.1f} GFLOP/s; streaming read+write "
        f"{bandwidth / 1e9:.1f} GB/s; G evaluations/s: "
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in trate.items()))
  options = {} if args.xla_defaults else lo.compiler_options()
  print(f"compiler options: {options or 'XLA defaults'}")
  out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
         "matmul_gflop_per_s": rate / 1e9, "stream_gb_per_s": bandwidth / 1e9,
         "transcendental_g_per_s": {k: v / 1e9 for k, v in trate.items()},
         "compiler_options": options, "models": []}
  rates = (rate, bandwidth, trate)
  if args.model in ("mlp", "all"):
    out["models"].append(bench("MLP 784-1024-256-10, batch 128", mlp_problem, rates,
                               args.rounds, args.iters, opts, options))
  if args.model in ("transformer", "all"):
    out["models"].append(bench("transformer LM d=128 x2 (tasks.TransformerLMFamily)",
                               transformer_problem, rates, args.rounds, args.iters, opts, options))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
