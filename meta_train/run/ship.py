"""Package a finished meta-training run as a shipped checkpoint with a full header, and
export any run's newest checkpoint (or its initialization) as a `.lopt` file.

A shipped `.lopt` file carries, in its JSON header `info`: the run's config, the code
version (git commit) it was trained with, a summary of the meta-training curve and wall
time, and, once evaluated, its held-out results against tuned Adam. The weights are
the run's exported meta-parameters, unchanged.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Optional

import jax
import numpy as np
import yaml
from flax import serialization

import learned_opt
from learned_opt.meta_train.run import build
from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run.rundir import CHECKPOINT_DIR, CONFIG_FILE


def code_version(repo_dir: Optional[str] = None) -> str:
  """`git describe`-style commit of the checkout, or the package version outside git."""
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_dir, check=True,
                         capture_output=True, text=True, timeout=10).stdout.strip()
    return f"{learned_opt.__version__}+g{out}"
  except (OSError, subprocess.SubprocessError):
    return learned_opt.__version__


def curve_summary(run_dir: str, *, points: int = 10) -> dict:
  """Meta-loss at the start, end and best, and a few block means, from `metrics.jsonl`."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"{run_dir!r} has no metrics.jsonl: expected a `lopt meta-train` run folder")
  rows = [json.loads(line) for line in open(path) if line.strip()]
  rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])  # resumed runs
  loss = np.asarray([r["meta_loss"] for r in rows], np.float64)
  k = max(1, min(10, len(loss) // 5))
  edges = np.linspace(0, len(loss), min(points, len(loss)) + 1).astype(int)
  return {
      "outer_steps": int(rows[-1]["step"]),
      "meta_loss_first": float(loss[:k].mean()),
      "meta_loss_last": float(loss[-k:].mean()),
      "meta_loss_best_block": float(min(loss[a:b].mean() for a, b in zip(edges[:-1], edges[1:]))),
      "meta_loss_blocks": [round(float(loss[a:b].mean()), 4) for a, b in zip(edges[:-1], edges[1:])],
      "step_wall_s": float(sum(r.get("wall_s", 0.0) for r in rows)),
  }


def heldout_summary(results: dict, name: str) -> dict:
  """This optimizer's held-out numbers from an evaluation's `results.json` contents."""
  per_task = {}
  for task, t in results["tasks"].items():
    r, ref = t["optimizers"].get(name), t["optimizers"].get(results["reference"])
    if r is None or ref is None:
      continue
    mine, theirs = r["final_train_loss"], ref["final_train_loss"]
    per_task[task] = {"loss_ratio_vs_tuned_adam": (mine / theirs if mine is not None and theirs
                                                   else None),
                      "diverged": r["diverged"], "speedup_bound": r.get("speedup_bound")}
  return {"suite": results["suite"], "seeds": results["seeds"],
          "summary": results.get("summary", {}).get(name), "tasks": per_task}


def ship(run_dir: str, dest: str, *, wall_time_s: Optional[float] = None,
         results: Optional[dict] = None, name: Optional[str] = None) -> str:
  """Writes `dest` (.lopt): the run's exported optimizer with a provenance header.

  Args:
    run_dir: a finished `lopt meta-train` run folder (holds config.yaml, metrics.jsonl
      and the exported `final.lopt`).
    dest: the shipped file, e.g. checkpoints/hierarchical_hd.lopt.
    wall_time_s: measured wall time of the whole meta-training (compilation included).
    results: an evaluation (`results.json` contents) that includes this optimizer.
    name: its name in `results` (default: the file name of `dest`).
  """

  src = os.path.join(run_dir, "final.lopt")
  if not os.path.isfile(src):
    raise ValueError(f"{run_dir!r} has no final.lopt: the run has not finished")
  lopt, meta_params, info = learned_opt.load(src)
  with open(os.path.join(run_dir, "config.yaml")) as f:
    config = yaml.safe_load(f)
  info = {**info, "config": config, "code_version": code_version(os.path.dirname(os.path.abspath(dest))),
          "meta_training": {**curve_summary(run_dir), "wall_time_s": wall_time_s}}
  name = name or os.path.basename(dest).removesuffix(".lopt")
  if results is not None:
    info["heldout"] = heldout_summary(results, name)
  learned_opt.save(dest, lopt, meta_params, info)
  return dest


def export_run(run_dir: str, dest: Optional[str] = None, *, init: bool = False) -> tuple[str, int]:
  """Writes the meta-parameters of a run's newest checkpoint (a run stopped before its
  `num_steps` exports nothing itself), or with `init` its config's initialization, as a
  `.lopt` file; returns (its path, the outer step it holds).

  Args:
    run_dir: a `lopt meta-train` run folder (config.yaml and checkpoints/).
    dest: the file to write (default: RUN/step_<N>.lopt, or RUN/init.lopt).
    init: export `lopt.init_meta_params(key(seed))` of the run's config instead.

  Raises:
    ValueError: not a run folder, no checkpoint yet, or a checkpoint that does not fit
      the run's config (named with the path).
  """
  config_path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ValueError(f"{run_dir!r} has no {CONFIG_FILE}: expected a `lopt meta-train` run folder")
  cfg = config_lib.load_config(config_path)
  lopt = build.build_lopt(cfg.lopt)
  meta_params = jax.jit(lopt.init_meta_params)(jax.random.key(cfg.seed))
  step = 0
  if not init:
    latest = run_checkpoint.latest_checkpoint(os.path.join(run_dir, CHECKPOINT_DIR))
    if latest is None:
      raise ValueError(f"{run_dir!r} has no checkpoint yet (export its initialization with init)")
    step, path = latest
    meta_params = checkpoint_meta_params(path, meta_params)
  dest = dest or os.path.join(run_dir, "init.lopt" if init else f"step_{step}.lopt")
  learned_opt.save(dest, lopt, meta_params,
                   {"run": cfg.name, "outer_steps": step, "families": list(cfg.task.families),
                    "config": config_lib.config_to_dict(cfg),
                    "code_version": code_version(run_dir)})
  return dest, step


def checkpoint_meta_params(path: str, template):
  """The learner's meta-parameters in a run checkpoint, in the structure of `template`
  (the architecture's `init_meta_params`).

  Raises:
    ValueError: an unreadable file, or one without meta-parameters of that shape.
  """
  try:
    with open(path, "rb") as f:
      state = serialization.msgpack_restore(f.read())
    saved = state["learner"]["meta_params"]
    restored = serialization.from_state_dict(template, saved)
    jax.tree.map(_check_leaf, template, restored)
  except Exception as e:  # msgpack raises several types on a truncated or foreign file
    raise ValueError(f"checkpoint {path} does not hold meta-parameters of this "
                     f"architecture: {e}") from e
  return jax.tree.map(jax.numpy.asarray, restored)


def _check_leaf(template, x):
  if np.shape(x) != np.shape(template):
    raise ValueError(f"array of shape {np.shape(x)} where the architecture has "
                     f"{np.shape(template)}")
