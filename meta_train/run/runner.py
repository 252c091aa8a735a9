"""A meta-training run: config -> objects, outer loop, checkpoints, metrics, export.

The run folder holds `config.yaml` (the validated config), `metrics.jsonl`,
`checkpoints/ckpt_<step>.msgpack` and, at the end, the exported meta-parameters. A run
checkpoints every `run.checkpoint_every` outer steps, at the end, and on Ctrl-C;
`resume=True` continues from the newest checkpoint and produces exactly the states an
uninterrupted run would (the key of every outer step is a function of the seed and the
step number, and checkpoints hold every array of the learner and the pools).
"""
from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import jax
import tqdm
import yaml

import learned_opt
from learned_opt import _extras
from learned_opt.meta_train.learner.outer import LearnerState
from learned_opt.meta_train.learner.trainer import MetaTrainer, Trainer
from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run.metrics import MetricsWriter

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


class RunResult(NamedTuple):
  learner: LearnerState        # final learner state (meta_params inside)
  states: list                 # final estimator pool states
  lopt: Any                    # the learned optimizer that was meta-trained
  run_dir: str
  finished: bool               # reached outer.num_steps (False if stopped early)
  export_path: str | None


def build_trainer(cfg: config_lib.MetaTrainConfig, *, workers: int = 0,
                  ray_address: str | None = None) -> Trainer:
  """The lopt, one estimator per family and the outer optimizer, from a config.

  workers > 0 spreads the pools over that many Ray worker actors, on a local Ray or on
  the cluster at `ray_address` ("auto", "HOST:PORT"); 0 trains in this process.
  """
  lopt = config_lib.build_lopt(cfg.lopt)
  estimators = config_lib.build_estimators(cfg, lopt)
  optimizer = config_lib.build_outer_optimizer(cfg.outer)
  if ray_address is not None and workers < 1:
    raise ValueError(f"--ray-address {ray_address} needs --workers N (N >= 1), got {workers}")
  if workers:
    _extras.require("ray", purpose="meta-training with --workers")
    # distributed/ is the only sub-package that imports ray (an install extra).
    from learned_opt.meta_train.distributed.pool import RayMetaTrainer
    return RayMetaTrainer(estimators, optimizer, accumulate=cfg.outer.accumulate,
                          num_workers=workers, address=ray_address)
  return MetaTrainer(estimators, optimizer, accumulate=cfg.outer.accumulate)


def _check_run_dir(cfg, run_dir: str, resume: bool) -> None:
  text = config_lib.dump_config(cfg)
  path = os.path.join(run_dir, CONFIG_FILE)
  has_ckpt = run_checkpoint.latest_checkpoint(os.path.join(run_dir, CHECKPOINT_DIR)) is not None
  if resume:
    if not os.path.exists(path):
      raise ValueError(f"cannot resume: {run_dir!r} has no {CONFIG_FILE}; expected a run folder")
    with open(path) as f:
      old = f.read()
    # The run's length may change on resume (train longer); nothing else may.
    strip = lambda t: config_lib.config_from_dict(
        config_lib.apply_overrides(yaml.safe_load(t), ["outer.num_steps=0"]))
    if strip(old) != strip(text):
      raise ValueError(f"cannot resume {run_dir!r}: its {CONFIG_FILE} differs from this config "
                       "(only outer.num_steps may change on resume)")
  elif has_ckpt:
    raise ValueError(f"{run_dir!r} already holds checkpoints; pass --resume to continue it or "
                     "choose another --out")
  os.makedirs(run_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def export_meta_params(path: str, lopt, meta_params, info: dict) -> str:
  """Writes the meta-parameters in the learned_opt checkpoint format."""
  learned_opt.save(path, lopt, meta_params, info)
  return path


def run_meta_training(cfg: config_lib.MetaTrainConfig, run_dir: str, *, resume: bool = False,
                      progress: bool = True, stop_after: int | None = None, workers: int = 0,
                      ray_address: str | None = None) -> RunResult:
  """Meta-trains as configured, writing into `run_dir`.

  Args:
    cfg: the validated config.
    run_dir: the run folder (created; must hold no checkpoints unless `resume`).
    resume: continue from the newest checkpoint in `run_dir`.
    progress: show a tqdm progress bar.
    stop_after: stop (with a checkpoint) after this many outer steps in this call.
    workers, ray_address: see `build_trainer` (not part of the config: a run may
      resume with another number of workers).
  """
  # The architecture first (cheap): one that checkpoints cannot save fails before any
  # work, not at export after hours of training.
  config_lib.build_lopt(cfg.lopt)
  _check_run_dir(cfg, run_dir, resume)
  trainer = build_trainer(cfg, workers=workers, ray_address=ray_address)
  try:
    return _run(trainer, cfg, run_dir, resume, progress, stop_after)
  finally:
    trainer.close()


def _run(trainer, cfg, run_dir, resume, progress, stop_after) -> RunResult:
  learner, states = trainer.init(cfg.seed, config_lib.initial_meta_params(cfg.lopt, trainer.lopt))
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_DIR)
  resume_step = None
  if resume:
    found = run_checkpoint.latest_checkpoint(ckpt_dir)
    if found is not None:
      resume_step, path = found
      restored = run_checkpoint.restore(
          path, {"learner": learner, "states": trainer.gather_states(states, learner.meta_params)})
      learner, states = restored["learner"], trainer.scatter_states(restored["states"])
  writer = MetricsWriter(run_dir, resume_step=resume_step if resume else None,
                         tensorboard=cfg.run.tensorboard)
  total = cfg.outer.num_steps
  start = int(learner.step)
  end = total if stop_after is None else min(total, start + stop_after)
  bar = None
  if progress:
    bar = tqdm.tqdm(total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)

  def checkpoint():
    # Checkpoints hold the pools in the in-process layout, so a run resumes with any
    # number of workers.
    pools = trainer.gather_states(states, learner.meta_params)
    run_checkpoint.save(ckpt_dir, int(learner.step), {"learner": learner, "states": pools},
                        keep=cfg.run.keep_checkpoints)
    return pools

  try:
    while int(learner.step) < end:
      t0 = time.perf_counter()
      learner, states, metrics = trainer.step(cfg.seed, learner, states)
      metrics = jax.device_get(metrics)
      wall = time.perf_counter() - t0
      step = int(learner.step)
      metrics["inner_steps_per_s"] = trainer.inner_steps_per_outer_step / wall
      if step % cfg.run.log_every == 0 or step == end:
        writer.write(step, {**metrics, "wall_s": wall})
      if bar is not None:
        bar.update(1)
        bar.set_postfix(meta_loss=f"{float(metrics['meta_loss']):.4f}",
                        inner_steps_s=f"{metrics['inner_steps_per_s']:.0f}")
      if step % cfg.run.checkpoint_every == 0 and step != end:
        checkpoint()
  except KeyboardInterrupt:
    # learner/states are only reassigned after a completed step, so they are consistent.
    checkpoint()
    raise
  finally:
    if bar is not None:
      bar.close()
    writer.close()
  states = checkpoint()
  finished = int(learner.step) >= total
  export_path = None
  if finished and cfg.run.export:
    export_path = export_meta_params(
        os.path.join(run_dir, cfg.run.export), trainer.lopt, learner.meta_params,
        {"run": cfg.name, "outer_steps": int(learner.step), "families": list(cfg.task.families),
         "config": config_lib.config_to_dict(cfg)})
  return RunResult(learner, states, trainer.lopt, run_dir, finished, export_path)
