"""`lopt plot RUN`: PNG plots of a run's meta-loss and meta-gradient norm."""
from __future__ import annotations

import math
import os

from learned_opt import _extras
from learned_opt.meta_train.run.metrics import read_metrics

# (metric, y-axis label, log scale)
PLOTS = (("meta_loss", "meta-loss (normalized)", False),
         ("grad_norm", "meta-gradient norm", True))


def _smooth(values: list[float], window: int) -> list[float]:
  out, acc = [], []
  for v in values:
    acc.append(v)
    if len(acc) > window:
      acc.pop(0)
    out.append(sum(acc) / len(acc))
  return out


def plot_run(run_dir: str, out_dir: str | None = None, *, smooth: int = 10) -> list[str]:
  """Writes one PNG per metric in `PLOTS` to `out_dir` (default RUN/plots); returns paths.

  Args:
    run_dir: a meta-training run folder (with metrics.jsonl).
    out_dir: where the PNGs go.
    smooth: window of the moving average drawn over the raw curve.
  """
  plt = _extras.pyplot(purpose="lopt plot")

  records = read_metrics(run_dir)
  out_dir = out_dir or os.path.join(run_dir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for key, label, log in PLOTS:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not points:
      continue
    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, alpha=0.35, label="raw")
    ax.plot(steps, _smooth(list(values), smooth), label=f"mean of {smooth}")
    ax.set_xlabel("outer step")
    ax.set_ylabel(label)
    if log:
      ax.set_yscale("log")
    ax.set_title(f"{os.path.basename(os.path.normpath(run_dir))}: {label}")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"{key}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths
