"""`lopt meta-train CONFIG`, `lopt export RUN` and `lopt plot RUN`."""
from __future__ import annotations

import argparse
import importlib.resources
import os
import shlex
import sys

from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run import ship
from learned_opt.meta_train.run.plot import plot_run
from learned_opt.meta_train.run.rundir import CHECKPOINT_DIR, CONFIG_FILE
from learned_opt.meta_train.run.runner import run_meta_training


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("meta-train", help="meta-train a learned optimizer from a YAML config")
  p.add_argument("config", nargs="?", default=None,
                 help="YAML config (a path, or the name of a shipped config such as 'tiny')")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set estimator.sigma=0.02 (repeatable)")
  p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
  p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--workers", type=int, default=0, metavar="N",
                 help="spread the task pools over N Ray worker actors (default 0: in-process)")
  p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                 help="join this Ray cluster instead of starting a local Ray (needs --workers)")
  p.set_defaults(func=_meta_train)

  p = sub.add_parser("export", help="write a run's newest checkpoint (or its initialization) "
                     "as a .lopt file, e.g. to evaluate a run stopped early")
  p.add_argument("run", help="run folder written by `lopt meta-train`")
  p.add_argument("--out", default=None, help="the .lopt file (default: RUN/step_<N>.lopt)")
  p.add_argument("--init", action="store_true",
                 help="export the config's initialization (the untrained optimizer) instead")
  p.set_defaults(func=_export)

  p = sub.add_parser("plot", help="plot a meta-training run's meta-loss and gradient norm (PNG)")
  p.add_argument("run", help="run folder written by `lopt meta-train`")
  p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN/plots)")
  p.add_argument("--smooth", type=int, default=10, help="moving-average window")
  p.set_defaults(func=_plot)


def resolve_config_path(name: str) -> str:
  """A config path as given, else a config shipped in learned_opt.configs."""
  if os.path.exists(name):
    return name
  shipped = importlib.resources.files("learned_opt.configs")
  candidate = shipped / (name if name.endswith(".yaml") else name + ".yaml")
  if candidate.is_file():
    return str(candidate)
  names = sorted(f.name[:-5] for f in shipped.iterdir() if f.name.endswith(".yaml"))
  raise ValueError(f"config {name!r} is neither a file nor a shipped config; shipped: {', '.join(names)}")


def continue_command(args, out: str, *, resume: bool = True) -> str:
  """The `lopt meta-train` command that continues this one: the same config, every
  `--set` in order, `--out`, the same workers, and `--resume`; shell-quoted (shlex), so
  it runs as printed whatever the values hold (spaces, brackets, quotes)."""
  cmd = ["lopt", "meta-train"] + ([args.config] if args.config else [])
  for item in args.overrides:
    cmd += ["--set", item]
  cmd += ["--out", out]
  if args.workers:
    cmd += ["--workers", str(args.workers)]
  if args.ray_address:
    cmd += ["--ray-address", args.ray_address]
  if args.no_progress:
    cmd.append("--no-progress")
  if resume:
    cmd.append("--resume")
  return shlex.join(cmd)


def _meta_train(args) -> int:
  path = resolve_config_path(args.config) if args.config else None
  cfg = config_lib.load_config(path, args.overrides)
  out = args.out or os.path.join("runs", cfg.name)
  try:
    result = run_meta_training(cfg, out, resume=args.resume, progress=not args.no_progress,
                               workers=args.workers, ray_address=args.ray_address)
  except KeyboardInterrupt:
    latest = run_checkpoint.latest_checkpoint(os.path.join(out, CHECKPOINT_DIR))
    if latest is not None:
      print(f"\ninterrupted; checkpoint of outer step {latest[0]} written. Continue with:\n"
            f"  {continue_command(args, out)}", file=sys.stderr)
    else:
      # Stopped before the run folder had its config: there is nothing to resume.
      resumable = os.path.exists(os.path.join(out, CONFIG_FILE))
      print(f"\ninterrupted before the first checkpoint. Start again with:\n"
            f"  {continue_command(args, out, resume=resumable)}", file=sys.stderr)
    return 130
  print(f"run folder: {result.run_dir}")
  if result.export_path:
    print(f"meta-parameters: {result.export_path}")
  return 0


def _plot(args) -> int:
  for path in plot_run(args.run, args.out, smooth=args.smooth):
    print(path)
  return 0


def _export(args) -> int:
  path, step = ship.export_run(args.run, args.out, init=args.init)
  print(f"{path} (outer step {step})")
  return 0
