"""What every subcommand shares: ``--json`` and ``--storage-option``, exit statuses, output helpers
and progress bars (tqdm, shown only when stdout is a terminal, so scripts and pipes get clean output)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tqdm import tqdm

from shardstore.other_contents import refuse_other_contents
from shardstore.errors import ShardstoreError

__all__ = ["refuse_other_contents", "EXIT_OK", "EXIT_FAILED", "EXIT_INPUT", "INPUT_ERRORS", "add_common_options", "error_text", "key_value", "storage_options",
           "print_json", "progress", "human_bytes"]

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2
# Raised by the library when what it was pointed at cannot be used: reported in one line, exit 2.
INPUT_ERRORS = (ShardstoreError, OSError, ValueError, KeyError)


def error_text(exc: BaseException) -> str:
    """The message of an input error (a ``KeyError``'s own, without the quotes ``str`` adds)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument(
        "--storage-option", "-o", action="append", default=[], metavar="KEY=VALUE", type=key_value,
        help="an fsspec storage option for every URL (repeatable), e.g. -o anon=true -o endpoint_url=http://...; "
        "values true/false/null and numbers are parsed as JSON",
    )


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--storage-option`` pairs as the one dict fsspec takes (None when there are none)."""
    return dict(args.storage_option) or None


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def progress(total: int | None, description: str, unit: str = "B") -> tqdm:
    """A progress bar on stderr, disabled unless stdout is a terminal; ``update(n)`` it from any thread."""
    return tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                disable=not sys.stdout.isatty(), leave=False)


def human_bytes(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    size, i = float(n), 0
    while size >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{n} B" if i == 0 else f"{size:.1f} {units[i]}"
