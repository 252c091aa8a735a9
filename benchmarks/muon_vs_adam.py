"""Tuned Muon vs tuned Adam on the small transformer LM: steps to reach Adam's final loss.

Both optimizers are tuned at the same horizon (`--steps`, default 1,000) over their own
log-spaced learning-rate grid with `learned_opt.meta_train.tune_learning_rate` (one
vmapped, jitted program per optimizer; same initialization and minibatches for every run).
Muon's Adam part (embeddings, head, biases, norms) uses tuned Adam's learning rate, so the
tuning compares what Muon changes: the hidden weight matrices. The target is Adam's loss
at the end of training (mean training loss of the last `--window` steps); Muon's curve,
smoothed by the same trailing mean, is searched for the first step that reaches it.
Reported: that step count over Adam's, and the same ratio in wall-clock time (Muon's
Newton-Schulz iterations cost more per step). Jordan et al. report Muon reaching AdamW's
loss with about half the compute on 30M-200M parameter GPTs; this task is ~100K params.

Usage: python benchmarks/muon_vs_adam.py [--steps 1000] [--family transformer_synthetic]
         [--batch 16] [--model-dim D] [--num-layers L] [--data-dir DIR] [--seed 0]
         [--json muon_vs_adam.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np
import optax

from learned_opt import meta_train
from learned_opt import tasks
from learned_opt.baselines import muon
from learned_opt.meta_train import tune_learning_rate

# Half a decade apart, around where each landed on this task (GPU runs at batch 32: Adam
# 3e-3, Muon 3e-3 to 1e-2 with a flat optimum; Muon at 1e-1 and above far worse).
ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
MUON_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _muon_with_adam_lr(lr, *, adam_lr):
  return muon(lr, adam_learning_rate=adam_lr)


def trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
  """[T] mean of x[max(0, t - window + 1) : t + 1] for every t (NaN-propagating)."""
  c = np.cumsum(np.concatenate([[0.0], x]))
  t = np.arange(1, len(x) + 1)
  lo = np.maximum(0, t - window)
  return (c[t] - c[lo]) / (t - lo)


def steps_to_reach(curve: np.ndarray, target: float, window: int) -> int | None:
  """First step count whose trailing-mean loss is <= target (None if never)."""
  smooth = trailing_mean(curve, window)
  hits = np.nonzero(smooth[window - 1:] <= target)[0]
  return int(hits[0]) + window if hits.size else None


def seconds_per_step(task, optimizer, num_steps: int) -> float:
  """Best of 2 timed runs of `tasks.train` after one compiling run."""
  run = lambda seed: meta_train.train(task, optimizer, num_steps=num_steps, key=jax.random.key(seed))
  jax.block_until_ready(run(0))
  best = float("inf")
  for seed in (1, 2):
    start = time.perf_counter()
    jax.block_until_ready(run(seed))
    best = min(best, time.perf_counter() - start)
  return best / num_steps


def _finite_or_none(x: np.ndarray) -> list:
  return [float(v) if np.isfinite(v) else None for v in x]  # JSON has no NaN


def _edge_note(result) -> str:
  i = result.best_index
  return " (at the grid's edge: widen it)" if i in (0, len(result.grid) - 1) else ""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--family", default="transformer_synthetic")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--window", type=int, default=50, help="steps in the loss average")
  # 16 keeps the default run under ~10 minutes on a shared 2-core CPU.
  parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
  parser.add_argument("--model-dim", type=int, default=None, help="transformer width")
  parser.add_argument("--num-layers", type=int, default=None, help="transformer depth")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--timing-steps", type=int, default=100)
  parser.add_argument("--json", default="muon_vs_adam.json")
  args = parser.parse_args()

  family = tasks.get_family(args.family, args.data_dir)
  family = family.replace(batch_size_range=(args.batch, args.batch))
  for field in ("model_dim", "num_layers"):
    if getattr(args, field) is not None:
      family = family.replace(**{field: getattr(args, field)})
  task = family.task()
  num_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(task.init, jax.random.key(0))))
  print(f"{args.family}: {num_params:,} params, batch {args.batch}, {args.steps} steps, "
        f"device {jax.devices()[0].device_kind}")

  start = time.perf_counter()
  adam = tune_learning_rate(task, optax.adam, grid=ADAM_GRID, num_steps=args.steps,
                            seed=args.seed, final_window=args.window)
  adam_lr = adam.best_lr
  make_muon = functools.partial(_muon_with_adam_lr, adam_lr=adam_lr)
  mu = tune_learning_rate(task, make_muon, grid=MUON_GRID, num_steps=args.steps,
                          seed=args.seed, final_window=args.window)
  tune_s = time.perf_counter() - start

  target = float(adam.final_losses[adam.best_index])
  adam_steps = args.steps
  muon_steps = steps_to_reach(mu.best_curve, target, args.window)
  step_ratio = None if muon_steps is None else muon_steps / adam_steps

  adam_sps = seconds_per_step(task, optax.adam(adam_lr), args.timing_steps)
  muon_sps = seconds_per_step(task, make_muon(mu.best_lr), args.timing_steps)
  time_ratio = None if step_ratio is None else step_ratio * muon_sps / adam_sps

  print(f"\n{'lr':>8} {'adam final':>11}   {'lr':>8} {'muon final':>11}")
  for a_lr, a_l, m_lr, m_l in zip(adam.grid, adam.final_losses, mu.grid, mu.final_losses):
    print(f"{a_lr:>8.0e} {a_l:>11.4f}   {m_lr:>8.0e} {m_l:>11.4f}")
  print(f"\ntuned Adam lr {adam_lr:.0e}{_edge_note(adam)}, tuned Muon lr {mu.best_lr:.0e}"
        f"{_edge_note(mu)} (its Adam part at {adam_lr:.0e})")
  print(f"{'':<28} {'Adam':>10} {'Muon':>10} {'Muon/Adam':>10}")
  print(f"{'final loss (last %d steps)' % args.window:<28} {target:>10.4f} "
        f"{mu.final_losses[mu.best_index]:>10.4f}")
  fmt = lambda v: "never" if v is None else f"{v}"
  print(f"{'steps to reach Adam final':<28} {adam_steps:>10} {fmt(muon_steps):>10} "
        f"{'-' if step_ratio is None else f'{step_ratio:.2f}':>10}")
  print(f"{'ms per step':<28} {1e3 * adam_sps:>10.2f} {1e3 * muon_sps:>10.2f} "
        f"{muon_sps / adam_sps:>10.2f}")
  print(f"{'time to reach Adam final':<28} {'':>10} {'':>10} "
        f"{'-' if time_ratio is None else f'{time_ratio:.2f}':>10}")
  print(f"(tuning both grids took {tune_s:.0f} s)")

  out = {"family": args.family, "params": int(num_params), "batch": args.batch,
         "model_dim": getattr(family, "model_dim", None),
         "num_layers": getattr(family, "num_layers", None),
         "steps": args.steps, "window": args.window, "seed": args.seed,
         "device": jax.devices()[0].device_kind,
         "adam": {"grid": adam.grid.tolist(), "final_losses": _finite_or_none(adam.final_losses),
                  "best_lr": adam_lr, "seconds_per_step": adam_sps},
         "muon": {"grid": mu.grid.tolist(), "final_losses": _finite_or_none(mu.final_losses),
                  "best_lr": mu.best_lr, "adam_learning_rate": adam_lr,
                  "seconds_per_step": muon_sps},
         "target_loss": target, "adam_steps_to_target": adam_steps,
         "muon_steps_to_target": muon_steps, "step_ratio": step_ratio,
         "time_ratio": time_ratio, "tuning_seconds": tune_s}
  with open(args.json, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
