"""`lopt eval` (learned optimizers vs tuned baselines on a suite) and `lopt report RUN`."""
from __future__ import annotations

import argparse
import os

import learned_opt
from learned_opt.meta_train.eval import candidates
from learned_opt.meta_train.eval import evaluation
from learned_opt.meta_train.eval import report


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("eval", help="evaluate learned optimizers against tuned Adam, Muon and "
                     "SafeRate on a held-out suite")
  p.add_argument("--optimizer", action="append", default=None, metavar="NAME_OR_PATH",
                 help="a shipped learned optimizer, a .lopt file, or saferate+<either>; "
                 "one that takes a learning rate is tuned over the grid, or run at one peak "
                 "rate with NAME@LR (e.g. run/final.lopt@1e-2) (repeatable; default: every "
                 "shipped optimizer)")
  p.add_argument("--pretrained", action="store_true",
                 help="also evaluate every shipped learned optimizer (with --optimizer)")
  p.add_argument("--baselines-only", action="store_true",
                 help="evaluate the baselines alone (no learned optimizer), e.g. to fill "
                 "--cache from several processes, each with its own --baselines and --out")
  p.add_argument("--suite", default="heldout",
                 help="heldout, heldout_short, heldout_offline, safeguard, or several joined with '+'")
  p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--baselines", default=",".join(candidates.DEFAULT_BASELINES),
                 help="comma-separated baselines (adam is the reference and always runs); "
                 f"known: {', '.join(candidates.BASELINES)}")
  p.add_argument("--lr-grid", type=_floats, default=None,
                 help="learning rates of the tuned baselines (default: 7 values, 1e-4..1e-1)")
  p.add_argument("--out", default=None, help="run folder (default: runs/eval_<suite>)")
  p.add_argument("--data-dir", default=None, help="local dataset root (default: $LOPT_DATA_DIR)")
  p.add_argument("--workers", type=int, default=1, help="(task, optimizer) pairs evaluated in parallel processes")
  p.add_argument("--ray", default=None, metavar="ADDRESS",
                 help="evaluate tasks on a Ray cluster ('auto' or an address)")
  p.add_argument("--fresh", action="store_true", help="ignore tasks already in the run folder")
  p.add_argument("--tune-seeds", type=int, default=None, metavar="K",
                 help="tuned optimizers pick their learning rate on the first K seeds and run "
                 "it on the others (default: the whole grid on every seed)")
  p.add_argument("--cache", default=None, metavar="DIR",
                 help="reuse and store baselines' results in DIR, keyed by the task's and the "
                 "baseline's definitions, grid and seeds (e.g. the committed reports/cache)")
  p.add_argument("--report", action="store_true", help="also write the markdown report")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=_eval)

  p = sub.add_parser("report", help="write a markdown report (tables, plots) of an evaluation")
  p.add_argument("run", help="run folder written by `lopt eval`")
  p.add_argument("--out", default=None, help="report path (default: RUN/report.md)")
  p.add_argument("--title", default="lopt evaluation")
  p.set_defaults(func=_report)


def _eval(args) -> int:
  if args.baselines_only and (args.optimizer or args.pretrained):
    raise ValueError("--baselines-only evaluates no learned optimizer; drop it or drop "
                     f"--optimizer {args.optimizer or []} / --pretrained")
  learned = list(args.optimizer or [])
  if not args.baselines_only and (args.optimizer is None or args.pretrained):
    learned += [n for n in learned_opt.list_pretrained() if n not in learned]
  baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
  bad = [b for b in baselines if b not in candidates.BASELINES]
  if bad:
    raise ValueError(f"unknown baseline {bad[0]!r}; expected some of {', '.join(candidates.BASELINES)}")
  names = ["adam"] + [b for b in baselines if b != "adam"] + list(learned)
  out = args.out or os.path.join("runs", f"eval_{args.suite.replace('+', '_')}")
  kwargs = {} if args.lr_grid is None else {"lr_grid": args.lr_grid}
  results = evaluation.evaluate_suite(
      args.suite, names, out_dir=out, seeds=args.seeds, data_dir=args.data_dir,
      tasks=args.tasks.split(",") if args.tasks else None, workers=args.workers,
      ray_address=args.ray, progress=not args.no_progress, resume=not args.fresh,
      tune_seeds=args.tune_seeds, cache_dir=args.cache, **kwargs)
  ref = results["reference"]
  print(f"{'optimizer':<34} {'beats tuned ' + ref:>22} {'IQM speedup':>12} {'worst ratio':>12}  diverged")
  for name, s in results["summary"].items():
    worst = "n/a" if s["worst_loss_ratio"] is None else f"{s['worst_loss_ratio']:.2f}"
    iqm = f"{s['iqm_speedup']:.2f}x" if "iqm_speedup" in s else "n/a"
    print(f"{name:<34} {s['frac_beats_reference']:>21.0%} {iqm:>12} "
          f"{worst:>12}  {', '.join(s['diverged_tasks']) or 'none'}")
  print(f"results: {os.path.join(out, evaluation.RESULTS_FILE)}")
  if args.report:
    print(f"report: {report.write_report(out)}")
  return 0


def _report(args) -> int:
  print(report.write_report(args.run, out=args.out, title=args.title))
  return 0
