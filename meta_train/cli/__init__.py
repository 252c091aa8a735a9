"""The `lopt` command line: `main` wires the subcommands, one module each."""
from __future__ import annotations

import argparse
import sys

from learned_opt.meta_train.cli import eval as cli_eval
from learned_opt.meta_train.cli import meta as cli_meta
from learned_opt.meta_train.cli import tasks as cli_tasks
from learned_opt.tasks.datasets import DatasetError, DatasetNotFoundError


def _add_subcommands(sub: argparse._SubParsersAction) -> None:
  # Each module exposes `add_parser(subparsers)` that registers its subcommands and sets
  # `func` (args -> exit code).
  for module in (cli_tasks, cli_meta, cli_eval):
    module.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lopt", description="Learned-optimizer meta-training on JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  _add_subcommands(sub)
  args = parser.parse_args(argv)
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
