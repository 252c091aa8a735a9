"""A meta-training run: config -> objects, outer loop, checkpoints, metrics, export.

The run folder holds `config.yaml` (the validated config), `metrics.jsonl`,
`checkpoints/ckpt_<step>.msgpack` and, at the end, the exported meta-parameters. A run
checkpoints every `run.checkpoint_every` outer steps, at the end, and on Ctrl-C;
`resume=True` continues from the newest readable checkpoint and produces exactly the
states an uninterrupted run would (the key of every outer step is a function of the
seed and the step number, and checkpoints hold every array of the learner and the
pools). Folder handling (config.yaml, temp files, which checkpoint) is in `rundir.py`.

Ctrl-C. The first one lets the outer step in flight finish: its metrics line is
written, then the checkpoint of that step, then `KeyboardInterrupt` is raised. An
in-process step cannot be cut short anyway (Python handles the signal only once XLA
returns), and on Ray the pools advance in place on the workers, so a step's results are
only consistent once it completes. A second Ctrl-C raises at once; a step that had
already returned is still logged before the checkpoint. Either way the last line of
`metrics.jsonl` and the newest checkpoint are of the same step.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

import jax
import tqdm

import learned_opt
from learned_opt import _extras
from learned_opt.meta_train.learner.outer import LearnerState
from learned_opt.meta_train.learner.trainer import MetaTrainer, Trainer
from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run import rundir
from learned_opt.meta_train.run.metrics import MetricsWriter
from learned_opt.meta_train.run.rundir import CHECKPOINT_DIR, CONFIG_FILE  # noqa: F401

log = logging.getLogger(__name__)


class NoProgressError(ValueError):
  """Every outer step of a call was skipped (non-finite estimates): the meta-parameters
  did not change, so nothing is exported. A ValueError, so `lopt` prints one line."""


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


def export_meta_params(path: str, lopt, meta_params, info: dict) -> str:
  """Writes the meta-parameters in the learned_opt checkpoint format."""
  learned_opt.save(path, lopt, meta_params, info)
  return path


class _Interrupts:
  """SIGINT while the run loop is active: the first asks to stop after the outer step in
  flight (`requested`); a later one raises KeyboardInterrupt at once, except inside
  `critical()`, where it is held until the block ends (a metrics line and the step
  number that records it must not be torn apart). Outside the main thread (where
  Python delivers no signals) it does nothing."""

  def __init__(self):
    self.requested = False
    self._critical = False
    self._held = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    if not self.requested:
      self.requested = True
      sys.stderr.write("\nCtrl-C: stopping after the outer step in flight, then checkpointing "
                       "(Ctrl-C again to stop at once)\n")
    elif self._critical:
      self._held = True
    else:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def critical(self):
    self._critical = True
    try:
      yield
    finally:
      self._critical = False
    if self._held:
      self._held = False
      raise KeyboardInterrupt


def run_meta_training(cfg: config_lib.MetaTrainConfig, run_dir: str, *, resume: bool = False,
                      progress: bool = True, stop_after: int | None = None, workers: int = 0,
                      ray_address: str | None = None) -> RunResult:
  """Meta-trains as configured, writing into `run_dir`.

  Args:
    cfg: the validated config.
    run_dir: the run folder (created; must hold no checkpoints unless `resume`).
    resume: continue from the newest readable checkpoint in `run_dir`.
    progress: show a tqdm progress bar.
    stop_after: stop (with a checkpoint) after this many outer steps in this call.
    workers, ray_address: see `build_trainer` (not part of the config: a run may
      resume with another number of workers).

  Raises:
    KeyboardInterrupt: on Ctrl-C, after the checkpoint (see the module docstring).
    NoProgressError: this call ran outer steps and skipped every one (all estimates
      non-finite); the run is checkpointed, nothing is exported.
    ValueError: the config, run folder or a checkpoint does not fit.
  """
  # The architecture and init_from first (cheap): one that checkpoints cannot save, or
  # a bad init_from, fails before any work and before the run folder is touched.
  lopt = config_lib.build_lopt(cfg.lopt)
  initial = config_lib.initial_meta_params(cfg.lopt, lopt)
  rundir.check_run_dir(cfg, run_dir, resume)
  rundir.remove_stale_temp_files(run_dir, cfg.run.export)
  trainer = build_trainer(cfg, workers=workers, ray_address=ray_address)
  try:
    return _run(trainer, cfg, run_dir, resume, progress, stop_after, initial)
  finally:
    trainer.close()


def _run(trainer, cfg, run_dir, resume, progress, stop_after, initial) -> RunResult:
  learner, states = trainer.init(cfg.seed, initial)
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_DIR)
  resume_step = None
  if resume:
    found = rundir.restore_latest(
        ckpt_dir, {"learner": learner, "states": trainer.gather_states(states, learner.meta_params)})
    if found is not None:
      resume_step, restored = found
      learner, states = restored["learner"], trainer.scatter_states(restored["states"])
  writer = MetricsWriter(run_dir, resume_step=resume_step if resume else None,
                         tensorboard=cfg.run.tensorboard)
  total = cfg.outer.num_steps
  start = int(learner.step)
  end = total if stop_after is None else min(total, start + stop_after)
  bar = None
  if progress:
    bar = tqdm.tqdm(total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)

  saved = {"step": resume_step}

  def checkpoint(learner, states, *, again: bool = True):
    # Checkpoints hold the pools in the in-process layout, so a run resumes with any
    # number of workers.
    step = int(learner.step)
    if not again and saved["step"] == step:
      return None  # this very state is on disk already (e.g. stopped at a checkpoint step)
    pools = trainer.gather_states(states, learner.meta_params)
    run_checkpoint.save(ckpt_dir, step, {"learner": learner, "states": pools},
                        keep=cfg.run.keep_checkpoints)
    saved["step"] = step
    return pools

  # committed: the newest (learner, states) whose step is recorded (metrics line written
  # if due): what a checkpoint written now holds. pending: the trainer's last result,
  # committed or not. recorded: the newest recorded step. `pending` is set by one
  # assignment and the other two change only inside `interrupts.critical()`, so an
  # interrupt anywhere leaves them coherent, and the handler below can finish a step
  # that returned (on Ray the workers' pools have already advanced) instead of losing it.
  committed, pending, recorded = (learner, states), None, start
  counts = {"ran": 0, "skipped": 0}

  def record(result, wall):
    step = int(result[0].step)
    metrics = jax.device_get(result[2])
    metrics["inner_steps_per_s"] = trainer.inner_steps_per_outer_step / wall
    if step % cfg.run.log_every == 0 or step == end:
      writer.write(step, {**metrics, "wall_s": wall})
    counts["ran"] += 1
    counts["skipped"] += int(metrics["skipped"])
    return step, metrics

  try:
    with _Interrupts() as interrupts:
      while int(committed[0].step) < end:
        if interrupts.requested:
          raise KeyboardInterrupt
        t0 = time.perf_counter()
        pending = trainer.step(cfg.seed, *committed)
        with interrupts.critical():
          recorded, metrics = record(pending, time.perf_counter() - t0)
          committed = pending[:2]
        if bar is not None:
          bar.update(1)
          bar.set_postfix(meta_loss=f"{float(metrics['meta_loss']):.4f}",
                          inner_steps_s=f"{metrics['inner_steps_per_s']:.0f}")
        if recorded % cfg.run.checkpoint_every == 0 and recorded != end:
          checkpoint(*committed)
  except KeyboardInterrupt:
    if pending is not None and int(pending[0].step) > recorded:
      # The step finished but its line is not written: write it, so that the metrics
      # and the checkpoint below end at the same step.
      recorded, _ = record(pending, time.perf_counter() - t0)
    if pending is not None and int(pending[0].step) == recorded:
      committed = pending[:2]
    checkpoint(*committed, again=False)
    raise
  finally:
    if bar is not None:
      bar.close()
    writer.close()
  learner, states = committed
  states = checkpoint(learner, states)
  _check_progress(counts, cfg)
  finished = int(learner.step) >= total
  export_path = None
  if finished and cfg.run.export:
    export_path = export_meta_params(
        os.path.join(run_dir, cfg.run.export), trainer.lopt, learner.meta_params,
        {"run": cfg.name, "outer_steps": int(learner.step), "families": list(cfg.task.families),
         "config": config_lib.config_to_dict(cfg)})
  return RunResult(learner, states, trainer.lopt, run_dir, finished, export_path)


def _check_progress(counts: dict, cfg) -> None:
  """Warns when outer steps were skipped; raises when every step of this call was.

  The rule is per call: a resumed call that applies no update has not trained either,
  whatever earlier calls did, and exporting would present its input as its result.
  """
  ran, skipped = counts["ran"], counts["skipped"]
  if not skipped:
    return
  if skipped < ran:
    log.warning("%d of %d outer steps were skipped (non-finite meta-gradient estimates); see "
                "the 'skipped' column of metrics.jsonl", skipped, ran)
    return
  raise NoProgressError(
      f"all {ran} outer steps of this call were skipped: every meta-gradient estimate was "
      "non-finite (NaN/inf), so the meta-parameters did not change and nothing was exported "
      "(the run is checkpointed). Likely causes: estimator.sigma too small or too large "
      f"(it is {cfg.estimator.sigma:g}; perturbations must be representable in float32), "
      f"earlier updates with outer.learning_rate={cfg.outer.learning_rate:g} that drove the "
      "meta-parameters where every task diverges, or tasks whose loss is not finite")
