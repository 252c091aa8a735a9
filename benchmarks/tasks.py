"""Inner training steps per second of every task family at batch 128 (Adam, jitted scan).

Usage: python benchmarks/tasks.py [--steps 200] [--data-dir DIR] [--json OUT]
Families whose data is not available locally are listed as skipped.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import optax

from learned_opt import meta_train
from learned_opt import tasks

BATCH = 128


def _at_batch(family, batch):
  if hasattr(family, "batch_size_range"):
    return family.replace(batch_size_range=(batch, batch))
  return family  # quadratics have no batch


def steps_per_second(family, num_steps: int) -> tuple[float, int]:
  task = family.task()
  params = task.init(jax.random.key(0))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  optimizer = optax.adam(1e-3)  # one instance: train() recompiles for a new optimizer object
  run = lambda key: meta_train.train(task, optimizer, num_steps=num_steps, key=key)
  jax.block_until_ready(run(jax.random.key(0)))  # compile
  best = float("inf")
  for seed in range(1, 3):
    start = time.perf_counter()
    jax.block_until_ready(run(jax.random.key(seed)))
    best = min(best, time.perf_counter() - start)
  return num_steps / best, num_params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  rows = []
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {BATCH}")
  print(f"{'family':<30} {'params':>9} {'steps/s':>9}")
  for name in tasks.family_names():
    try:
      family = _at_batch(tasks.get_family(name, args.data_dir), BATCH)
    except tasks.DatasetNotFoundError:
      print(f"{name:<30} {'skipped (data not available)':>20}")
      continue
    rate, num_params = steps_per_second(family, args.steps)
    rows.append({"family": name, "params": num_params, "steps_per_s": rate})
    print(f"{name:<30} {num_params:>9} {rate:>9.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "batch": BATCH, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
