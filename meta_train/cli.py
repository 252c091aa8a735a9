"""The `lopt` command line. Each subcommand lives in its own module; this file wires them."""
from __future__ import annotations

import argparse
import sys


def _add_subcommands(sub: argparse._SubParsersAction) -> None:
  # Each module exposes `add_parser(subparsers)` that registers one subcommand and sets
  # `func` (args -> exit code). Imports stay lazy so `lopt --help` is fast.
  from learned_opt.meta_train import cli_tasks
  cli_tasks.add_parser(sub)
  # -- subcommands added by later modules go below this line --
  from learned_opt.meta_train import cli_meta
  cli_meta.add_parser(sub)
  from learned_opt.meta_train import cli_eval
  cli_eval.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lopt", description="Learned-optimizer meta-training on JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  _add_subcommands(sub)
  args = parser.parse_args(argv)
  from learned_opt.tasks.datasets import DatasetError, DatasetNotFoundError
  try:
    return int(args.func(args) or 0)
  except (KeyError, ValueError, DatasetError, DatasetNotFoundError) as e:
    # Bad input (unknown names, missing or corrupt data, invalid configs): one clear
    # line, no traceback. Programming errors still raise.
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"lopt {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
