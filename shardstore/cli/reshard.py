"""Rewrite a checkpoint with the chunk layout a target mesh loads fastest: one object per target shard,
so each rank of that mesh reads exactly one object per tensor. Streams cell by cell within a memory
budget, in parallel; SRC and DST may be in different stores. Examples:

  shardstore reshard ckpt/step-100 ckpt-tp8/step-100 --mesh 8 --placements "Shard(0)"
  shardstore reshard SRC DST --mesh 2,4 --placements "*.bias=Replicate(),Shard(0)" --placements "Shard(0),Shard(1)"

A --placements value is PLACEMENTS (every tensor) or PATTERN=PLACEMENTS (dotted names, fnmatch); the
first match wins. 0-d tensors, and tensors no rule matches, are written whole."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Iterator

from shardstore.storage import Storage
from shardstore.cli.common import EXIT_OK, key_value, human_bytes, print_json, progress, refuse_other_contents, storage_options
from shardstore.errors import IncompleteCheckpointError
from shardstore.reshard import DEFAULT_MEMORY_BUDGET, parse_rules, reshard

NAME = "reshard"
HELP = "rewrite a checkpoint with one object per shard of a target mesh"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the checkpoint to read")
    parser.add_argument("dst", metavar="DST", help="where to write the resharded checkpoint")
    parser.add_argument("--mesh", required=True, type=_mesh, help="target mesh shape: 8, or 2,4")
    parser.add_argument("--placements", action="append", required=True, metavar="[PATTERN=]PLACEMENTS",
                        help='e.g. "Shard(0)" or "*.norm.*=Replicate()" (repeatable; first match wins)')
    parser.add_argument("--memory-budget", type=int, default=DEFAULT_MEMORY_BUDGET, metavar="BYTES",
                        help=f"memory for cells in flight (default {human_bytes(DEFAULT_MEMORY_BUDGET)})")
    parser.add_argument("--overwrite", action="store_true", help="replace a shardstore checkpoint at DST")
    parser.add_argument("--dst-storage-option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help="storage options for DST only (default: those of --storage-option)")


def _mesh(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a mesh shape like 8 or 2,4, got {text!r}") from None


@contextmanager
def _other_format_refused(args: argparse.Namespace) -> Iterator[None]:
    try:
        yield
    except IncompleteCheckpointError:
        refuse_other_contents(Storage(args.src, storage_options(args)), "reshard")
        raise


def run(args: argparse.Namespace) -> int:
    rules = parse_rules(args.placements, len(args.mesh))
    with progress(None, "resharding") as bar, _other_format_refused(args):
        result = reshard(args.src, args.dst, args.mesh, rules, storage_options=storage_options(args),
                         dst_storage_options=dict(args.dst_storage_option) or None, overwrite=args.overwrite,
                         memory_budget=args.memory_budget, progress=bar.update)
    if args.json:
        print_json({"src": args.src, "dst": result.url, "mesh": list(args.mesh), "objects": result.objects,
                    "nbytes": result.nbytes})
    else:
        print(f"wrote {result.url}: {result.objects} objects, {human_bytes(result.nbytes)} for mesh {list(args.mesh)}")
    return EXIT_OK
