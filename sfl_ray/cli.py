"""`sfl-ray`: one command, a subcommand per tool.

    sfl-ray run --config quickstart            one experiment (also: python -m sfl_ray.run)
    sfl-ray compare --config compare_mnist     every algorithm on one job, one table
    sfl-ray report ...                         reports from run directories
    sfl-ray sweep ...                          a grid of runs

Each subcommand is its module's `main(argv)`, imported only when it is called; its `--help`
shows `sfl-ray <subcommand>` as the command.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Optional, Sequence

# name -> (module whose main(argv) runs it, one line for `sfl-ray --help`)
SUBCOMMANDS = {
    "run": ("sfl_ray.run", "run one experiment from a YAML job (or --resume one, --print-schema, --list-jobs)"),
    "compare": ("sfl_ray.compare", "run every algorithm on one job and write one comparison table"),
    "report": ("sfl_ray.report", "summarise finished run directories"),
    "sweep": ("sfl_ray.sweep", "run a grid of configs"),
}
EXIT_BAD_INPUT = 2


def usage() -> str:
    """`sfl-ray --help`: the subcommands, one line each."""
    from sfl_ray import __version__

    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: sfl-ray {{{','.join(SUBCOMMANDS)}}} [ARGS ...]", "",
             f"sfl_ray {__version__}: split federated learning on Ray.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in SUBCOMMANDS.items()]
    lines += ["", "`sfl-ray SUBCOMMAND --help` describes one; `sfl-ray --version` prints the version.",
              "Jobs shipped with the package: sfl-ray run --list-jobs."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `sfl-ray` console script; returns the exit code (2 for bad input, in one line)."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # e.g. `sfl-ray run --print-schema | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is quiet
        return 0


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_BAD_INPUT
    if args[0] == "--version":
        from sfl_ray import __version__
        print(f"sfl-ray {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"sfl-ray: unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)} (sfl-ray --help)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:  # a dependency of the subcommand is missing: that is a real error
            raise
        print(f"sfl-ray {name}: not available in this installation ({module_name} is missing)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _call(module.main, rest, f"sfl-ray {name}")


def _call(sub_main, argv: list[str], prog: str) -> int:
    """Run a subcommand's main with `prog` if it takes one; a config error it lets through is
    one line and exit 2, as everywhere else (e.g. a data error inside compare's loop); SystemExit
    from argparse passes through."""
    from sfl_ray.config_base import ConfigError

    takes_prog = "prog" in inspect.signature(sub_main).parameters
    try:
        code = sub_main(argv, prog=prog) if takes_prog else sub_main(argv)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
