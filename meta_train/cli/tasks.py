"""`lopt tasks` (list the registries) and `lopt train` (train one task with Adam)."""
from __future__ import annotations

import argparse
import time

import jax
import optax

from learned_opt import tasks
from learned_opt.meta_train.inner import loop
from learned_opt.tasks import registry, suites


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("tasks", help="list the registered task families and the held-out suite")
  p.set_defaults(func=_list_tasks)

  p = sub.add_parser("train", help="train one task family's default task with Adam; print the loss curve")
  p.add_argument("--task", default="mlp_synthetic", help="family name (see `lopt tasks`)")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None, help="local dataset root (default: $LOPT_DATA_DIR)")
  p.add_argument("--points", type=int, default=10, help="how many points of the curve to print")
  p.set_defaults(func=_train)


def _list_tasks(args) -> int:
  print("Meta-training families (offline data):")
  for s in registry.META_TRAIN_FAMILIES.values():
    print(f"  {s.name:<30} {s.description}")
  print("Families on named datasets (need the data locally; see README):")
  for s in registry.REAL_DATA_FAMILIES.values():
    print(f"  {s.name:<30} [{s.data}] {s.description}")
  print("Held-out evaluation suite:")
  for t in suites.HELDOUT_SUITE.values():
    mode = ", full batch" if t.full_batch else ""
    print(f"  {t.name:<30} [{t.data}, {t.num_steps} steps{mode}] {t.description}")
  return 0


def _train(args) -> int:
  family = tasks.get_family(args.task, args.data_dir)
  task = family.task()
  start = time.perf_counter()
  result = loop.train(task, optax.adam(args.lr), num_steps=args.steps, key=jax.random.key(args.seed))
  losses = jax.device_get(result.losses)
  elapsed = time.perf_counter() - start
  print(f"{family.name}: Adam(lr={args.lr}) for {args.steps} steps ({elapsed:.1f} s incl. compile)")
  every = max(1, args.steps // max(args.points, 1))
  for i in range(0, args.steps, every):
    window = losses[i:i + every]
    print(f"  steps {i:>6}-{min(i + every, args.steps) - 1:<6} mean loss {window.mean():.4f}  " + "#" * int(40 * min(window.mean() / losses[0], 1.0)))
  metrics = loop.evaluate(task, result.params)
  print(f"final train loss {float(result.final_loss):.4f}; test " +
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  return 0
