"""The ``shardstore`` command: one module per subcommand, each an ``add_arguments(parser)`` and a
``run(args) -> int``; this module only registers them and maps errors to exit statuses.

Exit status: 0 ok, 1 a check failed (``verify`` found damage, ``diff`` found differences), 2 a usage or
input error (bad arguments, nothing at a URL, an unreadable checkpoint). The library does the work
(``shardstore.inspect``, ``shardstore.verify``, ``shardstore.runs``, ``shardstore.diff``,
``shardstore.convert``, ``shardstore.reshard``); these modules parse arguments and print.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from shardstore.cli import common
from shardstore.cli import convert, diff, gc, inspect, ls, reshard, unlock, verify

__all__ = ["main"]

COMMANDS = (inspect, verify, ls, gc, unlock, diff, convert, reshard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardstore",
        description="Inspect, verify, list, prune, unlock, compare, convert and reshard shardstore checkpoints. "
        "Every URL may be a local path or any fsspec URL (s3://, gs://, memory://, ...).",
        epilog="Exit status: 0 ok, 1 a check failed, 2 a usage or input error.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.NAME, help=command.HELP, description=command.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        common.add_common_options(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except common.INPUT_ERRORS as exc:
        print(f"shardstore {args.command}: error: {common.error_text(exc)}", file=sys.stderr)
        return common.EXIT_INPUT
