"""`lopt report RUN`: a markdown report with tables and plots from `results.json`.

The report reads on GitHub or in a browser: a summary table (fraction of tasks where
each optimizer beats the reference (tuned AdamW-cosine when evaluated, else tuned Adam)
and each tuned baseline, IQM speedup with a bootstrap interval, median speedup, worst
train and test loss ratios, divergences), a per-task table of final losses relative to
the reference, the full-batch monotonicity check
(SafeRate's guarantee), and PNG plots: loss curves per task and a speedup chart.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from learned_opt import _extras
from learned_opt.meta_train.eval import evaluation
from learned_opt.meta_train.eval import metrics as M
from learned_opt.meta_train.eval.candidates import BASELINES
from learned_opt.tasks.suites import SUITES

REPORT_FILE = "report.md"
CURVES_PNG = "curves.png"
SPEEDUP_PNG = "speedup.png"
DPI = 100  # with the figure sizes below: >= 1200 px wide, legible labels


def _fmt(x: Optional[float], spec: str = ".3g") -> str:
  return "n/a" if x is None else format(x, spec)


def _order(results: dict) -> list[str]:
  """Baselines first (in their usual order), then the learned optimizers as evaluated."""
  names = list(results["optimizers"])
  return [b for b in BASELINES if b in names] + [n for n in names if n not in BASELINES]


def _color(i: int):
  """Distinct colors for up to 20 optimizers (matplotlib's tab20, dark shades first)."""
  import matplotlib
  cmap = matplotlib.colormaps["tab20"]
  return cmap((2 * i) % 20 + (i // 10) % 2)


def _style(opt: str) -> dict:
  """Learned optimizers drawn thicker and dashed, so they stand out among the baselines."""
  if opt in BASELINES:
    return {"lw": 1.1, "ls": "-"}
  return {"lw": 2.0, "ls": "--"}


def plot_curves(results: dict, path: str) -> None:
  """One panel per task: the seed-mean training loss of every optimizer (log scale)."""
  plt = _extras.pyplot(purpose="lopt report's plots")
  tasks = results["tasks"]
  n = len(tasks)
  cols = min(3, n)
  rows = math.ceil(n / cols)
  order = _order(results)
  fig, axes = plt.subplots(rows, cols, figsize=(max(12.0, 5.0 * cols), 3.8 * rows + 0.9),
                           squeeze=False)
  handles = {}
  for ax, (name, t) in zip(axes.flat, tasks.items()):
    curves = {o: [math.nan if y is None else y for y in t["optimizers"][o]["curve"]]
              for o in order if o in t["optimizers"]}
    # Log scale unless a loss is negative; a loss that underflowed to exactly 0 is left
    # out of the log plot rather than forcing a linear one.
    positive = all(y >= 0 for ys in curves.values() for y in ys if not math.isnan(y))
    for i, opt in enumerate(order):
      r = t["optimizers"].get(opt)
      if r is None:
        continue
      ys = [math.nan if positive and y == 0 else y for y in curves[opt]]
      # Same color and style in every panel; one legend for the figure (the rates each
      # tuned optimizer chose are in the report's per-task tables).
      (line,) = ax.plot(r["curve_steps"], ys, color=_color(i), **_style(opt))
      handles.setdefault(opt, line)
    if positive:
      ax.set_yscale("log")
    ax.set_title(name, fontsize=11)
    ax.set_xlabel("step", fontsize=10)
    ax.set_ylabel("training loss (seed mean)", fontsize=10)
    ax.tick_params(labelsize=9)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  ncol = min(len(handles), 6)
  fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=ncol, fontsize=9,
             frameon=False, bbox_to_anchor=(0.5, 1.0))
  legend_rows = math.ceil(len(handles) / max(ncol, 1))
  fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 * legend_rows + 0.1) / fig.get_figheight()))
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def plot_speedups(results: dict, path: str) -> None:
  """Grouped bars: steps the reference needs / steps each optimizer needs (log scale)."""
  plt = _extras.pyplot(purpose="lopt report's plots")
  tasks = list(results["tasks"])
  order = _order(results)
  ref = results.get("reference", evaluation.REFERENCE)
  opts = [o for o in order if o != ref]
  fig, ax = plt.subplots(figsize=(max(12.0, 1.4 * len(tasks) + 3), 5.0))
  width = 0.8 / max(len(opts), 1)
  for i, opt in enumerate(opts):
    vals, reached = [], []
    for t in tasks:
      r = results["tasks"][t]["optimizers"].get(opt, {})
      vals.append(r.get("speedup_bound") or math.nan)
      reached.append(r.get("speedup") is not None)
    bars = ax.bar(np.arange(len(tasks)) + i * width - 0.4 + width / 2, vals, width, label=opt,
                  color=_color(order.index(opt)))
    for bar, ok in zip(bars, reached):
      if not ok:  # never reached Adam's final loss: the bar is only an upper bound
        bar.set_hatch("///")
        bar.set_alpha(0.45)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_yscale("log")
  ax.set_xticks(np.arange(len(tasks)))
  ax.set_xticklabels(tasks, rotation=25, ha="right", fontsize=9)
  ax.set_ylabel(f"speedup vs tuned {ref}", fontsize=10)
  ax.set_title(f"hatched: never reached tuned {ref}'s final loss (bar = upper bound)", fontsize=10)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def _parts(results: dict) -> list[tuple[str, list[str]]]:
  """(suite name, its evaluated tasks) for each "+"-joined part of the evaluated suite."""
  known, out, seen = SUITES, [], set()
  for part in results["suite"].split("+"):
    names = [n for n in known.get(part, {}) if n in results["tasks"] and n not in seen]
    seen.update(names)
    if names:
      out.append((part, names))
  rest = [n for n in results["tasks"] if n not in seen]
  if rest:
    out.append((results["suite"], rest))
  return out


def _kind(results: dict, opt: str) -> str:
  """How an optimizer was run: tuned over the grid, as is, or learned (with or without a
  tuned learning rate)."""
  for t in results["tasks"].values():
    r = t["optimizers"].get(opt)
    if r is not None:
      if r["kind"] == "learned":
        if r.get("lr") is not None:
          return "learned, tuned lr"
        return "learned, fixed lr" if "@" in opt else "learned, as is"
      return "tuned lr" if r["kind"] == "tuned" else "as is"
  return "?"


def _speed(r: dict) -> str:
  if r.get("speedup") is not None:
    return f"{r['speedup']:.2f}x"
  return f"<{r['speedup_bound']:.2f}x" if r.get("speedup_bound") is not None else "n/a"


def compute_minutes(results: dict) -> dict[str, dict]:
  """Per optimizer: its wall time summed over the tasks it ran (minutes, as recorded when
  each result was computed: cached entries keep their original time), the tasks counted
  and how many of them came from the cache."""
  out = {}
  for t in results["tasks"].values():
    for opt, r in t["optimizers"].items():
      c = out.setdefault(opt, {"minutes": 0.0, "tasks": 0, "cached": 0})
      c["minutes"] += float(r.get("wall_s") or 0.0) / 60.0
      c["tasks"] += 1
      c["cached"] += bool(r.get("cached"))
  return out


def _compute_section(results: dict, opts: list[str]) -> list[str]:
  compute = compute_minutes(results)
  baselines = sum(compute[o]["minutes"] for o in opts if o in compute and o in BASELINES)
  lines = ["## Compute", "",
           "Wall time of each optimizer's whole protocol (its learning-rate grid on the tuning "
           "seeds, then the chosen rate on the others), summed over tasks, as recorded when "
           "each result was computed (a cached baseline keeps the time of the run that made "
           f"it, on whatever machine and load that was). The baselines together: "
           f"{baselines:.0f} min, a one-time cost that the cache saves every later run.", "",
           "| optimizer | tasks | wall time (min) | from cache |", "|---|---:|---:|---:|"]
  for opt in opts:
    if opt in compute:
      c = compute[opt]
      lines.append(f"| {opt} | {c['tasks']} | {c['minutes']:.1f} | {c['cached']} |")
  return lines + [""]


def render(results: dict, *, curves_png: str = CURVES_PNG, speedup_png: str = SPEEDUP_PNG,
           title: str = "lopt evaluation") -> str:
  """The report's markdown text."""
  ref = results.get("reference", evaluation.REFERENCE)
  opts = _order(results)
  lines = [f"# {title}", "",
           f"Suite `{results['suite']}`: {len(results['tasks'])} tasks, {results['seeds']} seeds "
           f"each (same initializations and batches for every optimizer). Tuned baselines pick "
           f"the best of {len(results['lr_grid'])} learning rates "
           f"({', '.join(f'{x:.2g}' for x in results['lr_grid'])}) per task by mean final "
           f"training loss. Speedup: steps tuned {ref} needs to reach its final loss divided by "
           "the steps the optimizer needs (running mean over 5% of the budget on minibatch "
           "tasks); `<x` means it never reached it (x bounds the speedup). The IQM speedup is "
           "the interquartile mean of per-seed speedups over tasks and seeds (a seed that "
           "never reaches the target counts at its bound), with a 95% bootstrap interval "
           "resampling tasks, then seeds. Diverged: a NaN, or a final loss above the initial "
           "one, on any seed.", "",
           "## Summary", ""]
  for part, names in _parts(results):
    sub = {n: results["tasks"][n] for n in names}
    summary = M.summarize(sub, reference=ref)
    if len(names) < len(results["tasks"]):
      lines += [f"Suite `{part}` ({len(names)} tasks):", ""]
    lines += [f"| optimizer | kind | beats tuned {ref} | IQM speedup [95% CI] | median speedup "
              "| worst train-loss ratio (task) | worst test-loss ratio | diverged | beats each tuned baseline |",
              "|---|---|---:|---:|---:|---|---:|---|---|"]
    for opt in opts:
      s = summary.get(opt)
      if s is None:
        continue
      iqm = (f"{s['iqm_speedup']:.2f}x [{s['iqm_speedup_ci95'][0]:.2f}, "
             f"{s['iqm_speedup_ci95'][1]:.2f}]" if "iqm_speedup" in s else "n/a")
      each = ", ".join(f"{b} {round(100 * f)}%" for b, f in s.get("frac_beats", {}).items())
      lines.append(f"| {opt} | {_kind(results, opt)} | {round(100 * s['frac_beats_reference'])}% "
                   f"of {s['num_tasks']} | {iqm} | {s['median_speedup']:.2f}x | "
                   f"{_fmt(s['worst_loss_ratio'], '.3g')} ({s['worst_task']}) | "
                   f"{_fmt(s.get('worst_test_loss_ratio'), '.3g')} | "
                   f"{', '.join(s['diverged_tasks']) or 'none'} | {each or '-'} |")
    lines.append("")
  lines += ["## Per task", "",
            f"Final training loss (mean over seeds; ratio to tuned {ref}), test loss, speedup. "
            "Learning rates at the edge of the grid are marked *edge*.", ""]
  for name, t in results["tasks"].items():
    mode = ", full batch" if t["full_batch"] else ""
    lines += [f"### {name}", "", f"{t['description']} ({t['num_steps']} steps{mode}).", "",
              "| optimizer | lr | final train loss | ratio | test loss | speedup | diverged |",
              "|---|---:|---:|---:|---:|---:|---|"]
    ref_loss = t["optimizers"].get(ref, {}).get("final_train_loss")
    for opt in opts:
      r = t["optimizers"].get(opt)
      if r is None:
        continue
      lr = "-"
      if r.get("lr") is not None:
        grid = r["grid"]["lr"]
        edge = r["lr"] in (grid[0], grid[-1])
        lr = f"{r['lr']:.2g}" + (" *edge*" if edge else "")
      loss = r["final_train_loss"]
      ratio = f"{loss / ref_loss:.2f}" if loss is not None and ref_loss else "n/a"
      lines.append(f"| {opt} | {lr} | {_fmt(loss, '.4g')} | {ratio} | {_fmt(r['test_loss'], '.4g')} "
                   f"| {_speed(r)} | {'**yes**' if M.result_diverged(r) else 'no'} |")
    lines.append("")
  lines += _compute_section(results, opts)
  full = {n: t for n, t in results["tasks"].items() if t["full_batch"]}
  if full:
    lines += ["## Full-batch tasks: does the loss ever increase?", "",
              "SafeRate certifies each step with Taylor enclosures of the loss, so on a full "
              "batch its loss may never increase. Largest step-to-step increase relative to "
              "the loss, over all steps and seeds (0: it never increased); *monotone* when "
              "no increase exceeds float32 rounding (1e-6 of the larger of the current and "
              "initial loss).", "",
              "| task | " + " | ".join(opts) + " |", "|---|" + "---:|" * len(opts)]
    for n, t in full.items():
      cells = []
      for opt in opts:
        r = t["optimizers"].get(opt)
        cells.append("-" if r is None else _fmt(r.get("max_relative_increase"), ".2g")
                     + (" *monotone*" if r.get("monotone") else "")
                     + (" (diverged)" if M.result_diverged(r) else ""))
      lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Plots", "", f"![loss curves]({curves_png})", "", f"![speedups]({speedup_png})", "",
            f"Raw numbers: `{evaluation.RESULTS_FILE}` (lopt {results.get('lopt_version', '?')}"
            + (f", {results['wall_s'] / 60:.1f} min" if results.get("wall_s") else "") + ").", ""]
  return "\n".join(lines)


def write_report(run_dir: str, *, out: Optional[str] = None, title: str = "lopt evaluation") -> str:
  """Writes `report.md` (and its PNGs) for the evaluation in `run_dir`; returns its path."""
  results = evaluation.load_results(run_dir)
  if not results.get("tasks"):
    raise ValueError(f"{run_dir!r}: results.json holds no evaluated task yet")
  out = out or os.path.join(run_dir, REPORT_FILE)
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  plot_curves(results, os.path.join(folder, CURVES_PNG))
  plot_speedups(results, os.path.join(folder, SPEEDUP_PNG))
  with open(out, "w") as f:
    f.write(render(results, title=title))
  return out
