"""SafeRate benchmarks: step-time ratio, bound tightness, and the published MNIST figure.

    python benchmarks/saferate.py                      # all three parts
    python benchmarks/saferate.py --part speed         # SafeRate[Adam] vs Adam step time
    python benchmarks/saferate.py --part tightness     # eta* vs a dense line search
    python benchmarks/saferate.py --part mnist --data-dir /path/with/mnist --out figs/
    python benchmarks/saferate.py --part families  # soundness on every task family

speed: jitted full-batch steps of Adam and SafeRate[Adam] on the MLP and transformer LM
  task families (default configs), timed interleaved in one run; also the pieces
  (value_and_grad, the enclosure pass alone) so the ratio can be attributed.
tightness: along SafeRate[Adam] runs, the bound's minimizer eta* against the best eta of
  a dense search of f; prints the distribution of eta_best / eta* (see `tightness`).
families: the soundness check of tests/test_bounds.py (slow) with its numbers printed:
  every meta-training task family, two sampled configs, a random unit-norm direction,
  at the largest trust region t in 1e-1..1e-6 where the bound is finite and at 10 t;
  the enclosure [lo, hi] against the observed remainder (f(eta) - f(0) - f'(0) eta) / eta^2
  over 1,000 eta in [0, t], and the worst margin of the bound relative to 1 + |f|.
mnist: Streeter & Dillon (2022), Fig. 5 setting: a one-hidden-layer MLP on 1,000 MNIST
  images (the t10k file's first 1,000), full batch, float64; Adam with its learning rate
  tuned on a log grid (best final loss) vs SafeRate[Adam]; training loss on a log axis,
  written to <out>/saferate_mnist.png.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from learned_opt.baselines import adam_direction, saferate_adam, saferate_step  # noqa: E402
from learned_opt.bounds import enclosure, fusion, taylor_bounds  # noqa: E402


def _cast(tree, dtype):
  return jax.tree_util.tree_map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _task(name, dtype):
  """A task at its default config; `mlp_tanh` is mlp_synthetic with tanh (act_id 1)."""
  from learned_opt.tasks import get_family
  fam = get_family("mlp_synthetic" if name == "mlp_tanh" else name)
  cfg = fam.default_cfg()
  if name == "mlp_tanh":
    cfg = {**cfg, "act_id": jnp.asarray(1, jnp.int32)}
  task = fam.task(cfg)
  params = _cast(task.init(jax.random.key(0)), dtype)
  batch = _cast(task.full_batch(), dtype)
  return params, (lambda p: task.loss(p, jax.random.key(0), batch))


@contextlib.contextmanager
def _before_speedups():
  """Traces as the bounds did before the gelu/silu chain rules and before matmuls outside
  recurrences stopped carrying a value range."""
  new_bilinear, new_const = enclosure.bilinear, enclosure.bilinear_const
  enclosure.bilinear = lambda op, a, b, t, **_: new_bilinear(op, a, b, t, ranges=True)
  enclosure.bilinear_const = lambda op, a, b, t, **_: new_const(op, a, b, t, ranges=True)
  try:
    with fusion.disabled():
      yield
  finally:
    enclosure.bilinear, enclosure.bilinear_const = new_bilinear, new_const


def _timeit(fn, args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def speed(args):
  print("== speed: median seconds per full-batch step (jitted), ratio to Adam ==")
  for name in args.speed_tasks.split(","):
    for dtype in [jnp.dtype(x) for x in args.dtypes.split(",")]:
      params, loss = _task(name, dtype)
      adam, safe = optax.adam(1e-3), saferate_adam()
      sa, ss = adam.init(params), safe.init(params)
      d = jax.tree_util.tree_map(lambda x: -jnp.sign(x) * 1e-3, params)

      @jax.jit
      def adam_step(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = adam.update(g, s, p)
        return optax.apply_updates(p, u), s, v

      def safe_step_fn(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = safe.update(g, s, p, value_fn=loss)
        return optax.apply_updates(p, u), s, v
      safe_step = jax.jit(safe_step_fn)

      # The trust region is traced, as in SafeRate's own step (a constant one lets XLA
      # fold parts of the pass that a real step computes).
      bound = lambda p, d, t: taylor_bounds(loss, p, d, t)
      t_region = jnp.asarray(1e-2, dtype)
      pieces = {
          "forward": (jax.jit(loss), (params,)),
          "value_and_grad": (jax.jit(jax.value_and_grad(loss)), (params,)),
          "bound pass": (jax.jit(bound), (params, d, t_region)),
          "adam step": (adam_step, (params, sa)),
          "saferate[adam] step": (safe_step, (params, ss)),
      }
      if args.before:  # the same pieces traced as before the speed-ups
        pieces["bound pass, before"] = (jax.jit(lambda p, d, t: bound(p, d, t)),
                                        (params, d, t_region))
        pieces["saferate step, before"] = (jax.jit(lambda p, s: safe_step_fn(p, s)),
                                           (params, ss))
      t0 = time.perf_counter()
      for k, (fn, a) in pieces.items():  # compile everything first
        with _before_speedups() if "before" in k else contextlib.nullcontext():
          out = jax.block_until_ready(fn(*a))
        if "bound" in k:
          print(f"  {k}: remainder at t = 1e-2 [{float(out.remainder.lo):.4g}, "
                f"{float(out.remainder.hi):.4g}]")
      compile_s = time.perf_counter() - t0
      # Interleave the repeats so load changes on a shared machine hit both alike.
      times = {k: [] for k in pieces}
      for _ in range(args.repeats):
        for k, (fn, a) in pieces.items():
          times[k].append(_timeit(fn, a, 1))
      med = {k: float(np.median(v)) for k, v in times.items()}
      base = med["adam step"]
      print(f"{name} {jnp.dtype(dtype).name} (compile of all pieces {compile_s:.0f}s; load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
      for k, v in med.items():
        print(f"  {k:22s} {v * 1e3:9.2f} ms   {v / base:5.2f}x Adam step"
              f"   {v / med['forward']:6.2f}x forward")
      print(f"  => SafeRate[Adam] / Adam = {med['saferate[adam] step'] / base:.2f}x")
      if args.before:
        print(f"  => before the speed-ups: {med['saferate step, before'] / base:.2f}x; "
              f"bound pass now / before = {med['bound pass'] / med['bound pass, before']:.2f}")


def tightness(args):
  print("== tightness: the bound's minimizer eta* vs a dense line search of f ==")
  print("   Probes along a SafeRate[Adam] run, in SafeRate's own trust region [0, T]:")
  print("   eta_best = argmin of f on 400 grid points of [0, T]; ratio eta_best / eta*, and")
  print("   the share of the best decrease that eta* gets, (f(0)-f(eta*)) / (f(0)-f(eta_best)).")
  for name in args.tight_tasks.split(","):
    params, loss = _task(name, jnp.float64)
    tx = saferate_adam()
    state = tx.init(params)
    direction_tx = adam_direction()  # SafeRate[Adam]'s direction, same state layout

    @jax.jit
    def step(p, s):
      g = jax.grad(loss)(p)
      u, s = tx.update(g, s, p, value_fn=loss)
      return optax.apply_updates(p, u), s

    @jax.jit
    def probe(p, s):
      d, _ = direction_tx.update(jax.grad(loss)(p), s.direction_state, p)
      t = s.max_step_size
      along = jax.vmap(lambda e: loss(jax.tree_util.tree_map(lambda a, v: a + e * v, p, d)))
      grid = jnp.linspace(0.0, 1.0, 401)[1:] * t
      f = along(grid)
      eta, info = saferate_step(loss, p, d, t)
      f_eta = along(eta[None])[0]
      return grid[jnp.argmin(f)], eta, info.value - f_eta, info.value - jnp.min(f)

    ratios, shares = [], []
    for i in range(args.tight_steps):
      if i % args.tight_every == 0 and i > 0:
        best, eta, gain, best_gain = map(float, probe(params, state))
        if best_gain > 0:
          ratios.append(best / max(eta, 1e-300))
          shares.append(gain / best_gain)
      params, state = step(params, state)
    r, sh = np.asarray(ratios), np.asarray(shares)
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    print(f"{name}: {len(r)} probes over {args.tight_steps} steps")
    print("  eta_best/eta* quantiles 10/25/50/75/90%: "
          + " ".join(f"{x:.3g}" for x in np.quantile(r, qs))
          + f"; within 2x: {np.mean(r <= 2):.0%}, within 4x: {np.mean(r <= 4):.0%}")
    print("  share of the best decrease, quantiles: " + " ".join(f"{x:.2f}" for x in np.quantile(sh, qs)))


def _family_case(name, seed):
  """As tests/test_bounds.py: a sampled config, float64 (LSTM float32: flax's LSTM carry
  is float32 whatever the params), a random unit-norm direction."""
  from learned_opt.tasks import get_family
  fam = get_family(name)
  task = fam.task(fam.sample(jax.random.key(seed)))
  dtype = jnp.float32 if "lstm" in name else jnp.float64
  params = _cast(task.init(jax.random.key(seed + 10)), dtype)
  batch = _cast(task.full_batch(), dtype)
  leaves, tdef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  d = tdef.unflatten([jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else jnp.zeros_like(x) for k, x in zip(keys, leaves)])
  norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(d)))
  d = jax.tree_util.tree_map(lambda x: x / norm, d)
  return params, d, (lambda p: task.loss(p, jax.random.key(0), batch))


def families(args):
  print("== families: enclosure soundness on every task family (1,000 eta per trust region) ==")
  print("   remainder: the bound [lo, hi] and the observed range of (f - f(0) - f'(0) eta) / eta^2;")
  print("   margin: min over eta of min(upper - f, f - lower) / (1 + |f|) (>= -rtol passes)")
  for name in args.families.split(","):
    rtol = 1e-5 if "lstm" in name else 1e-9
    for seed in range(2):
      params, d, loss = _family_case(name, seed)
      bound = jax.jit(lambda p, d, t: taylor_bounds(loss, p, d, t))
      step = lambda p, e: jax.tree_util.tree_map(
          lambda a, b: a + e * b if jnp.issubdtype(a.dtype, jnp.floating) else a, p, d)
      along = jax.jit(lambda p, etas: jax.lax.map(lambda e: loss(step(p, e)), etas, batch_size=25))
      finite_t = next((t for t in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
                       if np.isfinite(float(bound(params, d, t).remainder.hi))), None)
      if finite_t is None:
        print(f"  {name} seed {seed}: no finite bound down to t = 1e-6  FAIL")
        continue
      for t in (finite_t, 10 * finite_t):
        b = bound(params, d, t)
        etas = np.concatenate([np.random.default_rng(seed).uniform(0, t, 999), [t]])
        f = np.asarray(along(params, jnp.asarray(etas, b.value.dtype)), np.float64)
        v, s = float(b.value), float(b.slope)
        lo, hi = float(b.remainder.lo), float(b.remainder.hi)
        lin = v + s * etas
        margin = np.min(np.minimum(lin + hi * etas**2 - f, f - lin - lo * etas**2) / (1 + np.abs(f)))
        obs = (f - lin) / etas**2
        ok = margin >= -rtol
        print(f"  {name:22s} seed {seed} {jnp.dtype(b.value.dtype).name} t={t:.0e}: bound [{lo:.3g}, {hi:.3g}]"
              f"  observed [{obs.min():.3g}, {obs.max():.3g}]  margin {margin:.2e}  {'pass' if ok else 'FAIL'}",
              flush=True)


def _mnist(data_dir, n):
  from learned_opt.tasks.datasets import read_idx
  directory = pathlib.Path(data_dir) / "mnist" if (pathlib.Path(data_dir) / "mnist").is_dir() \
      else pathlib.Path(data_dir)
  x = read_idx(directory / "t10k-images-idx3-ubyte.gz")[:n].reshape(n, -1) / 255.0
  y = read_idx(directory / "t10k-labels-idx1-ubyte.gz")[:n].astype(np.int32)
  return jnp.asarray(x, jnp.float64), jnp.asarray(y)


def _mlp_loss(x, y, act):
  acts = {"softplus": jax.nn.softplus, "relu": jax.nn.relu, "tanh": jnp.tanh,
          "sigmoid": jax.nn.sigmoid}

  def loss(p):
    h = acts[act](x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return loss


def _run(tx, loss, params, steps, chunk=100):
  @jax.jit
  def many(p, s):
    def body(carry, _):
      p, s = carry
      v, g = jax.value_and_grad(loss)(p)
      u, s = tx.update(g, s, p, value_fn=loss)
      return (optax.apply_updates(p, u), s), v
    (p, s), vs = jax.lax.scan(body, (p, s), None, length=chunk)
    return p, s, vs

  state = tx.init(params)
  losses = []
  for _ in range(steps // chunk):
    params, state, vs = many(params, state)
    losses.append(np.asarray(vs))
  return np.concatenate(losses + [[float(loss(params))]])


def mnist(args):
  data_dir = args.data_dir or os.environ.get("LOPT_DATA_DIR")
  if not data_dir:
    raise SystemExit("mnist part: pass --data-dir (a folder with mnist/t10k-*-ubyte.gz) or set LOPT_DATA_DIR")
  x, y = _mnist(data_dir, args.mnist_examples)
  loss = _mlp_loss(x, y, args.activation)
  k1, k2 = jax.random.split(jax.random.key(0))
  h = args.hidden
  params = {"w1": jax.random.normal(k1, (784, h), jnp.float64) / np.sqrt(784.0),
            "b1": jnp.zeros((h,), jnp.float64),
            "w2": jax.random.normal(k2, (h, 10), jnp.float64) / np.sqrt(h),
            "b2": jnp.zeros((10,), jnp.float64)}
  print(f"== mnist: {args.mnist_examples} images, 784-{h}-10 {args.activation} MLP, full batch, "
        f"float64, {args.mnist_steps} steps ==")
  grid = [float(s) for s in args.adam_grid.split(",")]
  adam_runs = {}
  for lr in grid:
    t0 = time.perf_counter()
    adam_runs[lr] = _run(optax.adam(lr), loss, params, args.mnist_steps)
    print(f"  adam lr={lr:g}: final {adam_runs[lr][-1]:.3e}, min {np.nanmin(adam_runs[lr]):.3e} "
          f"({time.perf_counter() - t0:.0f}s)")
  finite = {lr: r for lr, r in adam_runs.items() if np.isfinite(r[-1])}
  best_lr = min(finite, key=lambda lr: finite[lr][-1])
  t0 = time.perf_counter()
  safe = _run(saferate_adam(), loss, params, args.mnist_steps)
  print(f"  saferate[adam]: final {safe[-1]:.3e} ({time.perf_counter() - t0:.0f}s); increases: "
        f"{int(np.sum(np.diff(safe) > 0))}, largest {max(0.0, float(np.max(np.diff(safe)))):.2e}")
  print(f"  tuned adam (lr={best_lr:g}) final {adam_runs[best_lr][-1]:.3e}; "
        f"saferate/adam final-loss ratio {safe[-1] / adam_runs[best_lr][-1]:.3g}")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.semilogy(adam_runs[best_lr], label=f"Adam (tuned lr={best_lr:g})")
  ax.semilogy(safe, label="SafeRate[Adam]")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (full batch)")
  ax.set_title(f"MNIST {args.mnist_examples} images, 1 hidden layer ({h}, {args.activation}), float64")
  ax.legend()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(out / "saferate_mnist.png", dpi=120)
  np.savez(out / "saferate_mnist.npz", saferate=safe, adam=adam_runs[best_lr], adam_lr=best_lr)
  print(f"  wrote {out / 'saferate_mnist.png'}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--part", default="speed,tightness,mnist")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--before", action="store_true",
                 help="speed: also time the pieces traced as before the gelu/silu rules and "
                      "range-free matmuls, side by side")
  p.add_argument("--dtypes", default="float32,float64")
  p.add_argument("--speed-tasks", default="mlp_synthetic,transformer_synthetic")
  p.add_argument("--tight-tasks", default="logreg_synthetic,mlp_synthetic,mlp_tanh")
  p.add_argument("--tight-steps", type=int, default=200)
  p.add_argument("--tight-every", type=int, default=5)
  p.add_argument("--families", default="quadratic,logreg_synthetic,mlp_synthetic,conv_synthetic,"
                 "lstm_synthetic,transformer_synthetic")
  p.add_argument("--data-dir", default=None, help="folder with mnist/ (default: $LOPT_DATA_DIR)")
  p.add_argument("--out", default="benchmarks/out")
  p.add_argument("--mnist-examples", type=int, default=1000)
  p.add_argument("--mnist-steps", type=int, default=2000)
  p.add_argument("--hidden", type=int, default=100)
  p.add_argument("--activation", default="softplus", choices=["softplus", "relu", "tanh", "sigmoid"])
  p.add_argument("--adam-grid", default="3e-4,1e-3,3e-3,1e-2,3e-2")
  args = p.parse_args()
  parts = args.part.split(",")
  unknown = set(parts) - {"speed", "tightness", "mnist", "families"}
  if unknown:
    raise SystemExit(f"unknown --part {sorted(unknown)}; expected speed, tightness, mnist, families")
  for part in ("speed", "tightness", "mnist", "families"):
    if part in parts:
      globals()[part](args)


if __name__ == "__main__":
  main()
