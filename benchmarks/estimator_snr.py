"""Signal in meta-gradient estimates: how far independent estimates agree in direction.

At fixed meta-parameters (the config's initialization), `--replicas` independent task
pools (different keys) each run `--burn-in` estimates, then `--keep` more whose
gradients are kept. Prints, side by side for each set of `--set` overrides:
  - across: the mean cosine between estimates of different pools. With E[g] = mu and
    noise of variance s^2 (summed over coordinates), E[cos] ~ |mu|^2 / (|mu|^2 + s^2):
    the share of an estimate's power that is signal (0: all noise);
  - consecutive: the cosine between successive estimates of one pool (PES's
    accumulated perturbations make them alike; they are not independent samples);
  - |g|, the estimate's norm, and the meta-loss.
The across-pool cosine's spread is understated by its printed error: estimates of one
pool are correlated.

Usage: python benchmarks/estimator_snr.py [CONFIG] [--set KEY=VALUE ...] [--set ...]
         [--replicas 4] [--burn-in 5] [--keep 4]
Each `--set` group (comma-separated overrides) is one row, e.g.
  --set estimator.sigma=0.01 --set estimator.sigma=0.05,estimator.num_tasks=8
"""
from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np

from learned_opt.meta_train.run import build
from learned_opt.meta_train.run import config as config_lib


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _cos(a, b) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def measure(config: str, overrides, *, replicas: int, burn_in: int, keep: int) -> dict:
  cfg = config_lib.load_config(config, overrides)
  lopt = build.build_lopt(cfg.lopt)
  theta = lopt.init_meta_params(jax.random.key(cfg.seed))
  estimators = build.build_estimators(cfg, lopt)
  start = time.perf_counter()
  grads, losses = [], []
  for r in range(replicas):
    key = jax.random.key(1000 + r)
    states = [e.init(jax.random.fold_in(key, i), theta) for i, e in enumerate(estimators)]
    kept = []
    for s in range(burn_in + keep):
      outs = []
      for i, e in enumerate(estimators):
        states[i], est = e.estimate(jax.random.fold_in(key, 1000 * (s + 1) + i), theta, states[i])
        outs.append(est)
      losses.append(float(np.mean([o.meta_loss for o in outs])))
      if s >= burn_in:  # the families' estimates averaged, as the learner combines them
        kept.append(_flat(jax.tree.map(lambda *g: sum(g) / len(g), *[o.grad for o in outs])))
    grads.append(kept)
  across = [_cos(grads[a][t], grads[b][u]) for a, b in itertools.combinations(range(replicas), 2)
            for t in range(keep) for u in range(keep)]
  consecutive = [_cos(g[t], g[t + 1]) for g in grads for t in range(keep - 1)]
  return {"overrides": list(overrides), "dim": int(grads[0][0].size),
          "across_cos": float(np.mean(across)),
          "across_cos_se": float(np.std(across) / np.sqrt(len(across))),
          "consecutive_cos": float(np.mean(consecutive)) if consecutive else None,
          "grad_norm": float(np.mean([np.linalg.norm(g) for k in grads for g in k])),
          "meta_loss": float(np.mean(losses)), "wall_s": time.perf_counter() - start}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("config", nargs="?", default="configs/pretrain_normalized.yaml")
  parser.add_argument("--set", action="append", default=[], dest="sets",
                      help="comma-separated overrides; one row per --set")
  parser.add_argument("--replicas", type=int, default=4)
  parser.add_argument("--burn-in", type=int, default=5)
  parser.add_argument("--keep", type=int, default=4)
  args = parser.parse_args()
  rows = [[o for o in s.split(",") if o] for s in args.sets] or [[]]
  print(f"{'overrides':60s} {'dim':>5s} {'across cos':>16s} {'consec.':>8s} {'|g|':>8s} "
        f"{'meta-loss':>9s} {'s':>5s}")
  for overrides in rows:
    m = measure(args.config, overrides, replicas=args.replicas, burn_in=args.burn_in,
                keep=args.keep)
    consec = "-" if m["consecutive_cos"] is None else f"{m['consecutive_cos']:.3f}"
    print(f"{','.join(overrides) or '(config)':60s} {m['dim']:5d} "
          f"{m['across_cos']:8.4f} +-{m['across_cos_se']:.4f} {consec:>8s} "
          f"{m['grad_norm']:8.3g} {m['meta_loss']:9.3f} {m['wall_s']:5.0f}", flush=True)


if __name__ == "__main__":
  main()
