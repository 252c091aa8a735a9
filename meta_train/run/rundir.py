"""The run folder: its config.yaml, stale temporary files, and which checkpoint to resume.

A run folder must stay resumable after a kill at any moment: files are written to a
temporary name and renamed over (a kill leaves the old file or the new, plus at worst a
temporary file that the next start removes), and a resume reads what it finds
defensively: an empty config.yaml, a torn metrics line (`metrics.py`) or an unreadable
newest checkpoint costs at most the steps after the previous readable checkpoint.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from learned_opt._atomic import write_atomic
from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run.metrics import METRICS_FILE

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
# Keys that may change when a run resumes: training longer (or shorter) is continuing.
RESUMABLE_KEYS = ("outer.num_steps", "run.tensorboard")
log = logging.getLogger(__name__)


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` via a fsynced temporary file renamed over it."""
  write_atomic(path, text)


def remove_stale_temp_files(run_dir: str, export: str | None) -> list[str]:
  """Removes temporary files left in `run_dir` by writes that a kill cut short: run
  checkpoints, the metrics rewrite, config.yaml and the export. Returns their paths."""
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_DIR)
  removed = [os.path.join(ckpt_dir, n) for n in run_checkpoint.remove_temp_files(ckpt_dir)]
  if os.path.isdir(run_dir):
    prefixes = tuple(f".{name}." for name in (CONFIG_FILE, export) if name)
    for name in sorted(os.listdir(run_dir)):
      if name == METRICS_FILE + ".tmp" or (name.startswith(prefixes) and name.endswith(".tmp")):
        os.remove(os.path.join(run_dir, name))
        removed.append(os.path.join(run_dir, name))
  if removed:
    log.warning("removed %d temporary file(s) left by an interrupted write: %s", len(removed),
                ", ".join(removed))
  return removed


def _normalized(data: dict) -> dict:
  """A config dict with defaults filled in (as `config_to_dict` writes it); the dict as
  it is if it no longer validates (written by an older lopt)."""
  try:
    return config_lib.config_to_dict(config_lib.config_from_dict(data))
  except ValueError:
    return data


def _fmt(value: Any) -> str:
  return "<unset>" if value == "<unset>" else repr(value)


def check_run_dir(cfg: config_lib.MetaTrainConfig, run_dir: str, resume: bool) -> None:
  """Checks that `run_dir` may hold this run, then writes its config.yaml.

  Raises:
    ValueError: a fresh run into a folder with checkpoints; a resume without a
      config.yaml, with one that is not a YAML mapping, or with one that differs from
      `cfg` in other keys than `RESUMABLE_KEYS` (each key named with both values).
  """
  path = os.path.join(run_dir, CONFIG_FILE)
  has_ckpt = run_checkpoint.latest_checkpoint(os.path.join(run_dir, CHECKPOINT_DIR)) is not None
  if resume:
    if not os.path.exists(path):
      raise ValueError(f"cannot resume: {run_dir!r} has no {CONFIG_FILE}; expected a run folder")
    with open(path) as f:
      old = config_lib.parse_yaml(f.read(), path)
    if old is None:
      # Only a write cut short leaves it empty (it is written whole, then renamed, since
      # this check exists). The checkpoint restore still checks the state's structure.
      log.warning("%s is empty (a write was cut short); resuming with the config given "
                  "now, which cannot be compared with the run's; it is written there again",
                  path)
    elif not isinstance(old, dict):
      raise ValueError(f"cannot resume: {path} holds a {type(old).__name__}, expected the "
                       "run's config (a mapping of sections)")
    else:
      diff = [d for d in config_lib.config_diff(_normalized(old), config_lib.config_to_dict(cfg))
              if d[0] not in RESUMABLE_KEYS]
      if diff:
        shown = "; ".join(f"{k}: run has {_fmt(a)}, this config {_fmt(b)}" for k, a, b in diff)
        raise ValueError(f"cannot resume {run_dir!r}: its {CONFIG_FILE} differs from this config "
                         f"in {len(diff)} key(s): {shown} (only {', '.join(RESUMABLE_KEYS)} "
                         "may change on resume; pass the same config and --set flags)")
  elif has_ckpt:
    raise ValueError(f"{run_dir!r} already holds checkpoints; pass --resume to continue it or "
                     "choose another --out")
  os.makedirs(run_dir, exist_ok=True)
  write_text_atomic(path, config_lib.dump_config(cfg))


def restore_latest(ckpt_dir: str, template: Any) -> tuple[int, Any] | None:
  """`(step, tree)` of the newest readable checkpoint in `ckpt_dir` (None: there is none).

  An unreadable newer checkpoint (truncated, empty) is skipped with a warning and, once
  an older one has been read, renamed to `<name>.corrupt` so that later saves, pruning
  and resumes do not trip on it again. A checkpoint that reads but does not fit
  `template` is an error, not skipped: it means another config, not a cut-short write.

  Raises:
    ValueError: checkpoints exist but none is readable (each named with its problem;
      nothing is renamed then), or one does not match `template`.
  """
  found = run_checkpoint.list_checkpoints(ckpt_dir)
  unreadable = []
  for step, path in reversed(found):
    try:
      tree = run_checkpoint.restore(path, template)
    except run_checkpoint.CorruptCheckpointError as e:
      log.warning("%s; falling back to the checkpoint before it", e)
      unreadable.append((path, e))
      continue
    for bad, _ in unreadable:
      log.warning("set aside unreadable checkpoint as %s", run_checkpoint.set_aside(bad))
    if unreadable:
      log.warning("resuming from %s (outer step %d)", path, step)
    return step, tree
  if unreadable:
    raise ValueError(f"cannot resume: no checkpoint in {ckpt_dir} is readable: "
                     + "; ".join(str(e) for _, e in unreadable)
                     + ". Move them away to start the run over")
  return None
