"""Meta-validation of a run: its learned optimizer at the initialization and at given
checkpoints, on fixed tasks of the config's families, side by side.

The meta-loss a run logs is measured on the pool it trains on, at whatever point of their
lives the tasks are, with the perturbations applied: too noisy to tell a small gain from
none. Here every candidate trains the same fixed tasks (2 drawn per family, unaugmented)
from scratch over the whole horizon, on the same seeds, under the schedule it meets at
use: an optimizer that takes a learning rate runs `with_learning_rate` (its harness) or
its bare direction under adamw_cosine's warmup-cosine, weight decay and mask at each peak of
`--lrs` (exactly as `lopt eval` runs it); others run as is.

Prints per candidate the mean over tasks of final training loss / initial loss at each
peak, and with the peak tuned per task (the best of the grid); `--baselines` adds
`lopt eval`'s baselines on the same tasks, seeds and grid for scale (e.g. adamw_cosine);
each `--variant` (comma-separated config overrides, e.g. lopt.options.init_rule=momentum)
adds that architecture at its initialization (a hand-set rule through the same harness).

Usage: python benchmarks/meta_validation.py CONFIG [CKPT ...] [--steps 500] [--seeds 2]
         [--lrs 1e-3 3e-3 1e-2 3e-2 1e-1] [--baselines adamw_cosine ...]
         [--variant KEY=VALUE,...] [--data-dir DIR] [--json OUT]
CKPT: run checkpoints (RUN/checkpoints/ckpt_*.msgpack) or exported `.lopt` files.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import learned_opt
from learned_opt.meta_train.eval import candidates as eval_candidates
from learned_opt.meta_train.inner import loop
from learned_opt.meta_train.run import build
from learned_opt.meta_train.run import ship
from learned_opt.meta_train.run import config as config_lib
from learned_opt.tasks import get_family


def _meta_params(path: str, template):
  if path.endswith(".lopt"):
    return learned_opt.load(path)[1]
  return ship.checkpoint_meta_params(path, template)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("config")
  parser.add_argument("checkpoints", nargs="*")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--tasks-per-family", type=int, default=2)
  parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
  parser.add_argument("--baselines", nargs="*", default=[])
  parser.add_argument("--variant", action="append", default=[],
                      help="comma-separated config overrides; its initialization is a candidate")
  parser.add_argument("--data-dir", default=os.environ.get("LOPT_DATA_DIR"))
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  cfg = config_lib.load_config(args.config)
  lopt = build.build_lopt(cfg.lopt)
  init = lopt.init_meta_params(jax.random.key(cfg.seed))
  candidates = {"initialization": init}
  for path in args.checkpoints:
    candidates[os.path.basename(path)] = _meta_params(path, init)
  lrs = jnp.asarray(args.lrs if learned_opt.takes_learning_rate(lopt) else [0.0])
  keys = loop.seed_keys(args.seeds, 100)
  families = [get_family(n, args.data_dir) for n in cfg.task.families]
  tasks = [f.task(f.sample(jax.random.key(7 + i))) for f in families
           for i in range(args.tasks_per_family)]
  # Learned candidates run exactly as `lopt eval` runs them (its schedule, weight decay
  # and harness), over this benchmark's grid.
  runs = [eval_candidates.learned_candidate(name, lopt, meta_params, lr_grid=tuple(args.lrs))
          for name, meta_params in candidates.items()]
  for variant in args.variant:
    v_lopt = build.build_lopt(config_lib.load_config(args.config, variant.split(",")).lopt)
    runs.append(eval_candidates.learned_candidate(
        variant, v_lopt, v_lopt.init_meta_params(jax.random.key(cfg.seed)),
        lr_grid=tuple(args.lrs)))
  runs += [eval_candidates.resolve(name, lr_grid=tuple(args.lrs)) for name in args.baselines]
  print(f"{len(tasks)} tasks, {args.steps} steps, {args.seeds} seeds; final/initial training "
        f"loss, mean over tasks, per peak {list(map(float, lrs))} and tuned per task")
  out = {}
  for cand in runs:
    name, grid = cand.name, jnp.asarray(cand.grid or (0.0,), jnp.float32)
    ratios = []
    for task in tasks:
      losses, final_train, _ = loop.run_grid(task, grid, keys, cand.aux, make=cand.make,
                                             num_steps=args.steps, full_batch=False,
                                             eval_params=cand.eval_params)
      initial = float(np.mean(np.asarray(losses)[:, :, 0]))
      ratios.append(np.mean(np.asarray(final_train), axis=1) / initial)  # [H]
    ratios = np.stack(ratios)  # [tasks, H]
    out[name] = {"per_lr": ratios.mean(axis=0).tolist(), "tuned": float(ratios.min(axis=1).mean())}
    print(f"{name:32s} per peak {np.array2string(ratios.mean(axis=0), precision=4)}  "
          f"tuned {out[name]['tuned']:.4f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "steps": args.steps, "seeds": args.seeds,
                 "lrs": list(map(float, lrs)), "results": out}, f, indent=1)


if __name__ == "__main__":
  main()
