"""GPU speed of learned optimizers: fused Pallas kernel vs XLA vs Adam, side by side.

Sections (all measured in one run, on whatever device JAX sees; `--gpu` insists on a GPU
and uses the issue's sizes, without it the sizes shrink so the script also runs on CPU):

* ceilings: device-to-device copy bandwidth and dense float32 matmul rate (JAX default
  precision, TF32 on an H100), the two numbers every floor below divides by;
* agreement: max |fused - xla| / max |xla| of one update on the device;
* train step: forward+backward+update of a ViT-B-sized stack of 12 pre-LN blocks (85M
  parameters, 32 x 197 tokens; `--gpu`) with Adam, PerParamMLP and HierarchicalLOpt,
  each on XLA and on the fused kernel, and the update alone; ratios to Adam;
* meta-training: a population of 784-32-10 MLP tasks (batch 128) trained by PerParamMLP
  at theta +- eps (antithetic pairs), 10 inner steps under `lax.scan`, vmapped over the
  population: inner steps/s and the share of the FLOP-bound rate (model fwd+bwd FLOPs +
  the optimizer network's FLOPs per parameter, at the measured matmul rate).

Needs no ray and no tensorflow-datasets (the GPU image has neither).

Usage: python benchmarks/gpu.py [--gpu] [--json OUT] [--sections ceilings,agree,step,meta]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import learned_opt as lo


def _time(fn, *args, iters=10, rounds=5):
  """Median seconds per call of an already-compiled `fn` (blocks on its output)."""
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(iters):
      r = fn(*args)
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / iters)
  return statistics.median(out)


def ceilings(big: bool) -> dict:
  n = (1 << 28) if big else (1 << 22)
  x = jnp.arange(n, dtype=jnp.float32)
  copy = jax.jit(lambda a: a * 1.0001)
  t = _time(copy, x)
  m = 8192 if big else 1024
  a = jax.random.normal(jax.random.key(0), (m, m))
  b = jax.random.normal(jax.random.key(1), (m, m))
  mm = jax.jit(lambda a, b: a @ b)
  t_mm = _time(mm, a, b, iters=5)
  mm_hi = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
  t_hi = _time(mm_hi, a, b, iters=2)
  return {"copy_GBps": 8 * n / t / 1e9, "matmul_f32_default_TFLOPs": 2 * m ** 3 / t_mm / 1e12,
          "matmul_f32_highest_TFLOPs": 2 * m ** 3 / t_hi / 1e12}


# ---------------------------------------------------------------------------- models
class Block(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm()(x)
    qkv = nn.Dense(3 * d)(h).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads), -1)
    x = x + nn.Dense(d)(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(h)))


class Stack(nn.Module):
  dim: int
  heads: int
  depth: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = Block(self.dim, self.heads)(x)
    return nn.LayerNorm()(x)


def stack_problem(big: bool):
  dim, heads, depth, batch, tokens = (768, 12, 12, 32, 197) if big else (128, 4, 2, 8, 32)
  model = Stack(dim, heads, depth)
  x = jax.random.normal(jax.random.key(0), (batch, tokens, dim))
  y = jax.random.normal(jax.random.key(1), (batch, tokens, dim))
  params = model.init(jax.random.key(2), x)["params"]
  loss = lambda p, xb, yb: jnp.mean(jnp.square(model.apply({"params": p}, xb) - yb))
  return params, loss, (x, y), f"{depth} blocks d={dim}, {batch}x{tokens} tokens"


ONLY = None  # --opts: names of the optimizers to time (None: all)


def optimizers(fused_ok: bool):
  out = {"adam": None, "mlp_xla": lo.PerParamMLP(fused="xla"),
         "hier_xla": lo.HierarchicalLOpt(fused="xla")}
  if fused_ok:
    out["mlp_fused"] = lo.PerParamMLP(fused="pallas")
    out["hier_fused"] = lo.HierarchicalLOpt(fused="pallas")
  return {k: v for k, v in out.items() if ONLY is None or k in ONLY or k == "adam"}


def features_ms(params, grads, iters, rounds) -> dict:
  """The XLA part every path shares: features.compute (state advance + per-tensor stats)."""
  from learned_opt import features as feats
  out = {}
  for name, lopt in (("mlp", lo.PerParamMLP()), ("hier", lo.HierarchicalLOpt())):
    spec = lopt.spec
    st = jax.tree.map(jnp.copy, feats.init_state(spec, params, 1000))
    fn = jax.jit(lambda s, g, p, spec=spec: (lambda f, s2: (f.per_tensor, s2))(
        *feats.compute(spec, g, p, s, loss=jnp.float32(1.0))), donate_argnums=(0,))
    st = fn(st, grads, params)[1]
    ts = []
    for _ in range(rounds):
      t = time.perf_counter()
      for _ in range(iters):
        st = fn(st, grads, params)[1]
      jax.block_until_ready(st)
      ts.append((time.perf_counter() - t) / iters)
    out[name] = 1e3 * statistics.median(ts)
  return out


def make_tx(lopt):
  if lopt is None:
    return optax.adam(1e-4)
  return lo.to_optax(lopt, lopt.init_meta_params(jax.random.key(0)))


def agreement(fused_ok: bool) -> dict:
  """Max relative difference fused vs XLA at default (TF32) and highest matmul precision."""
  if not fused_ok:
    return {}
  out = {}
  for prec in ("default", "highest"):
    with jax.default_matmul_precision(prec):
      out.update({f"{k}_{prec}": v for k, v in _agreement().items()})
  return out


def _agreement() -> dict:
  params, loss_fn, batch, _ = stack_problem(False)
  grads = jax.grad(loss_fn)(params, *batch)
  out = {}
  for name, cls in (("mlp", lo.PerParamMLP), ("hier", lo.HierarchicalLOpt)):
    ups = {}
    for mode in ("xla", "pallas"):
      lopt = cls(fused=mode)
      theta = lopt.init_meta_params(jax.random.key(1))
      st = lopt.init(theta, params, num_steps=100)
      f = jax.jit(lambda s, g: lopt.update(theta, g, s, params, loss=jnp.float32(1.0)))
      _, st = f(st, grads)
      ups[mode] = f(st, grads)[0]
    err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
              for a, b in zip(jax.tree.leaves(ups["pallas"]), jax.tree.leaves(ups["xla"])))
    out[name] = err
  return out


def train_step(big: bool, fused_ok: bool, iters: int, rounds: int) -> dict:
  params, loss_fn, batch, desc = stack_problem(big)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  res = {"model": desc, "params": int(n_params)}
  res["fwd_bwd_ms"] = 1e3 * _time(grad_fn, params, *batch, iters=iters, rounds=rounds)
  grads = grad_fn(params, *batch)[1]
  try:
    res["features_compute_ms"] = features_ms(params, grads, iters, rounds)
    print("features.compute alone (ms):", res["features_compute_ms"], flush=True)
  except Exception as e:
    res["features_compute_ms"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  for name, lopt in optimizers(fused_ok).items():
    try:
      tx = make_tx(lopt)

      def step(p, s, xb, yb, tx=tx):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s

      def update(p, s, g, tx=tx):
        u, s = tx.update(g, s, p, loss=jnp.float32(1.0))
        return optax.apply_updates(p, u), s

      step = jax.jit(step, donate_argnums=(0, 1))
      update = jax.jit(update, donate_argnums=(0, 1))
      p = jax.tree.map(jnp.copy, params)
      # Copies: an init may hand one zeros array to two state slots, and donating a
      # buffer twice is an error.
      s = jax.tree.map(jnp.copy, tx.init(p))
      t0 = time.perf_counter()
      p, s = step(p, s, *batch)
      jax.block_until_ready(p)
      compile_s = time.perf_counter() - t0
      times, utimes = [], []
      for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
          p, s = step(p, s, *batch)
        jax.block_until_ready(p)
        times.append((time.perf_counter() - t) / iters)
      p, s = update(p, s, grads)
      for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
          p, s = update(p, s, grads)
        jax.block_until_ready(p)
        utimes.append((time.perf_counter() - t) / iters)
      res[name] = {"step_ms": 1e3 * statistics.median(times),
                   "update_ms": 1e3 * statistics.median(utimes), "compile_s": compile_s}
      del p, s
    except Exception as e:  # one optimizer failing must not hide the others' numbers
      res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      traceback.print_exc()
  adam = res["adam"]["step_ms"]
  for name in optimizers(fused_ok):
    if "step_ms" in res[name]:
      res[name]["x_adam_step"] = res[name]["step_ms"] / adam
  return res


# ------------------------------------------------------------------------ meta-training
def meta_problem(data_rows=4096):
  data_x = jax.random.normal(jax.random.key(10), (data_rows, 784))
  w_true = jax.random.normal(jax.random.key(11), (784, 10))
  data_y = jnp.argmax(data_x @ w_true, -1)

  def init(key):
    k1, k2 = jax.random.split(key)
    return {"l1": {"w": jax.random.normal(k1, (784, 32)) / 28.0, "b": jnp.zeros((32,))},
            "l2": {"w": jax.random.normal(k2, (32, 10)) / np.sqrt(32), "b": jnp.zeros((10,))}}

  def loss(p, key):
    i = jax.random.randint(key, (), 0, data_rows - 128)
    x = jax.lax.dynamic_slice_in_dim(data_x, i, 128)
    y = jax.lax.dynamic_slice_in_dim(data_y, i, 128)
    h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"])
    logits = h @ p["l2"]["w"] + p["l2"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return init, loss


def meta_throughput(pops, lopts: dict, rate: float, unroll: int = 10, rounds: int = 3) -> dict:
  init, loss = meta_problem()
  n_params = 784 * 32 + 32 + 32 * 10 + 10
  model_flops = 3 * 2 * 128 * (784 * 32 + 32 * 10)  # fwd + bwd of the two matmuls
  res = {"task": "MLP 784-32-10, batch 128", "task_params": n_params, "unroll": unroll}
  for name, lopt in lopts.items():
    f = len(lopt.spec.param_names())
    sizes = (f,) + tuple(lopt.hidden_sizes) + (2,)
    opt_flops = 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * n_params
    theta = lopt.init_meta_params(jax.random.key(0))

    def member(th, params, ostate, key, lopt=lopt):
      def body(carry, k):
        p, s = carry
        l, g = jax.value_and_grad(loss)(p, k)
        u, s = lopt.update(th, g, s, p, loss=l)
        return (optax.apply_updates(p, u), s), l
      (params, ostate), ls = jax.lax.scan(body, (params, ostate), jax.random.split(key, unroll))
      return params, ostate, jnp.mean(ls)

    def outer(theta, params, ostate, eps, key):
      # Antithetic pairs: member 2i sees theta + eps_i, member 2i+1 theta - eps_i.
      signs = jnp.tile(jnp.asarray([1.0, -1.0]), eps_leading(eps))
      ths = jax.tree.map(lambda t, e: t + signs.reshape((-1,) + (1,) * t.ndim)
                         * jnp.repeat(e, 2, axis=0), theta, eps)
      keys = jax.random.split(key, signs.shape[0])
      params, ostate, ls = jax.vmap(member)(ths, params, ostate, keys)
      g = jax.tree.map(lambda e: jnp.tensordot((ls[0::2] - ls[1::2]), e, 1), eps)
      return params, ostate, g

    fn = jax.jit(outer, donate_argnums=(1, 2))
    res[name] = {}
    for pop in pops:
      try:
        params = jax.vmap(init)(jax.random.split(jax.random.key(1), pop))
        ostate = jax.vmap(lambda p: lopt.init(theta, p, num_steps=1000))(params)
        eps = jax.tree.map(lambda t: 0.01 * jax.random.normal(jax.random.key(2),
                                                               (pop // 2,) + t.shape), theta)
        key = jax.random.key(3)
        t0 = time.perf_counter()
        params, ostate, g = fn(theta, params, ostate, eps, key)
        jax.block_until_ready(g)
        compile_s = time.perf_counter() - t0
        ts = []
        for _ in range(rounds):
          t = time.perf_counter()
          params, ostate, g = fn(theta, params, ostate, eps, key)
          jax.block_until_ready(g)
          ts.append(time.perf_counter() - t)
        sec = statistics.median(ts)
        sps = pop * unroll / sec
        res[name][str(pop)] = {"inner_steps_per_s": sps, "outer_step_ms": 1e3 * sec,
                               "flop_share": sps * (model_flops + opt_flops) / rate,
                               "compile_s": compile_s}
        print(f"meta {name} pop {pop}: {res[name][str(pop)]}", flush=True)
        del params, ostate
      except Exception as e:
        res[name][str(pop)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"meta {name} pop {pop}: {type(e).__name__}: {str(e)[:300]}")
  res["flops_per_inner_step"] = model_flops + opt_flops
  return res


def eps_leading(eps) -> int:
  return jax.tree.leaves(eps)[0].shape[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--gpu", action="store_true", help="require a GPU; the issue's sizes")
  parser.add_argument("--json", default="")
  parser.add_argument("--sections", default="ceilings,agree,step,meta")
  parser.add_argument("--pops", default="")
  parser.add_argument("--opts", default="", help="comma list, e.g. mlp_fused,hier_fused")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  global ONLY
  ONLY = set(args.opts.split(",")) if args.opts else None
  backend = jax.default_backend()
  if args.gpu and backend != "gpu":
    raise SystemExit(f"--gpu needs a GPU, but jax.default_backend() is {backend!r}")
  big = args.gpu
  fused_ok = backend == "gpu"  # the compiled kernel; interpret mode is far too slow to time
  sections = set(args.sections.split(","))
  out = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
         "backend": backend, "jax": jax.__version__}
  print(f"device: {out['device']} ({backend}), jax {jax.__version__}", flush=True)
  out["ceilings"] = ceilings(big)
  rate = out["ceilings"]["matmul_f32_default_TFLOPs"] * 1e12
  print(json.dumps(out["ceilings"]), flush=True)
  if "agree" in sections:
    try:
      out["agreement"] = agreement(fused_ok)
    except Exception as e:  # the timings below still say something
      out["agreement"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
      traceback.print_exc()
    print("agreement (max rel err fused vs xla):", out["agreement"], flush=True)
  save = lambda: args.json and json.dump(out, open(args.json, "w"), indent=1)
  save()
  if "step" in sections:
    out["train_step"] = train_step(big, fused_ok, args.iters, args.rounds)
    print(json.dumps(out["train_step"]), flush=True)
  save()
  if "meta" in sections:
    pops = [int(p) for p in args.pops.split(",")] if args.pops else (
        [64, 256, 1024, 8192] if big else [8, 32])
    lopts = {"mlp_xla": lo.PerParamMLP(fused="xla")}
    if fused_ok:
      lopts["mlp_fused"] = lo.PerParamMLP(fused="pallas")
    out["meta"] = meta_throughput(pops, lopts, rate)
  save()
  # The table last: the reader sees it at the end of the output.
  print(f"\n== {out['device']} ({backend}), jax {jax.__version__}, {out['date']}")
  c = out["ceilings"]
  print(f"copy {c['copy_GBps']:.0f} GB/s; f32 matmul {c['matmul_f32_default_TFLOPs']:.1f} "
        f"TFLOP/s (default precision), {c['matmul_f32_highest_TFLOPs']:.1f} (highest)")
  if "train_step" in out:
    ts = out["train_step"]
    print(f"\ntrain step, {ts['model']}, {ts['params'] / 1e6:.1f}M params, "
          f"fwd+bwd {ts['fwd_bwd_ms']:.2f} ms")
    print(f"{'optimizer':<12}{'step ms':>9}{'x Adam':>8}{'update ms':>11}")
    for name in optimizers(fused_ok):
      r = ts[name]
      if "error" in r:
        print(f"{name:<12} error: {r['error'][:100]}")
      else:
        print(f"{name:<12}{r['step_ms']:>9.2f}{r['x_adam_step']:>8.2f}{r['update_ms']:>11.2f}")
  if "meta" in out:
    m = out["meta"]
    print(f"\nmeta-training, {m['task']}, unroll {m['unroll']}, "
          f"{m['flops_per_inner_step'] / 1e6:.1f} MFLOP/inner step")
    print(f"{'optimizer':<12}{'pop':>6}{'inner steps/s':>15}{'% FLOP bound':>14}")
    for name in [k for k in m if isinstance(m[k], dict)]:
      for pop, r in m[name].items():
        if "error" in r:
          print(f"{name:<12}{pop:>6}  error: {r['error'][:80]}")
        else:
          print(f"{name:<12}{pop:>6}{r['inner_steps_per_s']:>15,.0f}{100 * r['flop_share']:>13.1f}%")


if __name__ == "__main__":
  main()
