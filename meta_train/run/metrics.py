"""Run metrics: one JSON object per logged outer step (`metrics.jsonl`), TensorBoard too.

TensorBoard events (`tb/`) are written only when asked for (`run.tensorboard: true`) and
tensorboardX is installed (it is not a dependency); asked for without it, the run says
so once (a `RuntimeWarning` naming `pip install tensorboardX`) and goes on with the JSON
lines. Either way the writer prints, once, where the metrics go.

A resumed run first drops the lines logged after its checkpoint, so the file reads as
if the run had never stopped. A last line cut short by a kill (no newline, not JSON) is
dropped with a warning: it holds nothing complete, and the step it belonged to comes
after the checkpoint, so the resumed run logs it again.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any, Mapping

from learned_opt._atomic import write_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
TENSORBOARD_MISSING = ("run.tensorboard is on, but tensorboardX is not installed, so no "
                       "TensorBoard events are written (metrics still go to {path}); "
                       "pip install tensorboardX, or set run.tensorboard: false")
log = logging.getLogger(__name__)


def _plain(v: Any):
  v = v.item() if hasattr(v, "item") else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep them visible as strings
  return v


def _read_records(path: str) -> tuple[list[dict], bool]:
  """The records of a metrics file, and whether its last line was torn (and skipped).

  Raises:
    ValueError: a line other than the last is not a JSON object (the file is damaged
      beyond a torn write), naming the file and line.
  """
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  # After a complete write the text ends with "\n", so the last piece is "".
  records, torn = [], False
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not a metrics record (a JSON object with an int 'step')")
    except ValueError as e:
      if number == len(lines):  # the last line, without its newline: a write cut short
        torn = True
        log.warning("%s: dropping a torn last line %d (%d characters; %s), left by a write "
                    "that was cut short", path, number, len(line), e)
        continue
      raise ValueError(f"{path}:{number}: not a metrics record: {e}") from e
    records.append(record)
  return records, torn


def read_metrics(run_dir: str) -> list[dict]:
  """All metric records of a run, in order (a torn last line is skipped with a warning)."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    raise ValueError(f"no {METRICS_FILE} in {run_dir!r}; expected a meta-training run folder")
  return _read_records(path)[0]


class MetricsWriter:
  """Appends metric records to `run_dir/metrics.jsonl` (and TensorBoard if asked for).

  On creation (the start of a run, fresh or resumed) it prints one line to stdout
  saying where the metrics go: the metrics.jsonl path and, when TensorBoard events are
  written, their folder.

  Args:
    run_dir: the run folder.
    resume_step: when resuming, records with step > resume_step are dropped first, and
      a torn last line (see `_read_records`).
    tensorboard: also write TensorBoard scalars to `run_dir/tb`; needs tensorboardX
      (not a dependency). Without it: one `RuntimeWarning` naming `pip install
      tensorboardX`, and only metrics.jsonl is written.
    announce: print the line saying where the metrics go.

  Attributes:
    path: the metrics.jsonl file.
    tensorboard_dir: the TensorBoard folder being written, or None.
  """

  def __init__(self, run_dir: str, *, resume_step: int | None = None, tensorboard: bool = False,
               announce: bool = True):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, METRICS_FILE)
    if resume_step is None:
      open(self.path, "w").close()
    elif os.path.exists(self.path):
      records, _ = _read_records(self.path)
      kept = [json.dumps(r) + "\n" for r in records if r["step"] <= resume_step]
      # Rewritten whole and renamed over, so a kill here leaves the old file or the new.
      write_atomic(self.path, "".join(kept))
    self._file = open(self.path, "a")
    self._tb = None
    self.tensorboard_dir = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional; not a dependency
      except ImportError:
        warnings.warn(TENSORBOARD_MISSING.format(path=self.path), RuntimeWarning, stacklevel=2)
      else:
        self.tensorboard_dir = os.path.join(run_dir, TENSORBOARD_DIR)
        self._tb = SummaryWriter(self.tensorboard_dir)
    if announce:
      print(self.destination(), flush=True)

  def destination(self) -> str:
    """One line: where this writer puts the metrics."""
    if self.tensorboard_dir is None:
      return f"metrics: {self.path}"
    return (f"metrics: {self.path}; TensorBoard: {self.tensorboard_dir} "
            f"(tensorboard --logdir {self.tensorboard_dir})")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
