"""Run metrics: one JSON object per logged outer step (`metrics.jsonl`), TensorBoard too.

A resumed run first drops the lines logged after its checkpoint, so the file reads as
if the run had never stopped.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"


def _plain(v: Any):
  v = v.item() if hasattr(v, "item") else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep them visible as strings
  return v


def read_metrics(run_dir: str) -> list[dict]:
  """All metric records of a run, in order."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    raise ValueError(f"no {METRICS_FILE} in {run_dir!r}; expected a meta-training run folder")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends metric records to `run_dir/metrics.jsonl` (and TensorBoard if available).

  Args:
    run_dir: the run folder.
    resume_step: when resuming, records with step > resume_step are dropped first.
    tensorboard: also write TensorBoard scalars when tensorboardX is importable.
  """

  def __init__(self, run_dir: str, *, resume_step: int | None = None, tensorboard: bool = True):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, METRICS_FILE)
    if resume_step is None:
      open(self.path, "w").close()
    elif os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional; not a dependency
        self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
      except ImportError:
        pass

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
