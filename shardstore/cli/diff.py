"""Compare two checkpoints (any format convert reads: zarr, safetensors, dcp, torch): keys only in one,
shapes and dtypes that differ, and the max absolute and relative difference per tensor; plain values (a
step count, config) where both formats hold them. Exit status 1 when anything differs (as diff(1) does)."""

from __future__ import annotations

import argparse

from shardstore.cli.common import EXIT_FAILED, EXIT_OK, print_json, progress, storage_options
from shardstore.convert.sources import open_source
from shardstore.diff import TensorDiff, diff_sources, diff_values

NAME = "diff"
HELP = "compare two checkpoints tensor by tensor; exit 1 if they differ"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="a checkpoint (any format shardstore convert reads)")
    parser.add_argument("b", metavar="B", help="another checkpoint")
    parser.add_argument("--all", action="store_true", help="also list the tensors that are the same")


def run(args: argparse.Namespace) -> int:
    options = storage_options(args)
    a, b = open_source(args.a, options), open_source(args.b, options)
    with progress(sum(m.nbytes for m in a.tensors().values()), "comparing") as bar:
        diffs = diff_sources(a, b, progress=bar.update)
    differ, values = [d for d in diffs if d.status != "same"], diff_values(a, b)
    status = EXIT_FAILED if differ or values else EXIT_OK
    if args.json:
        print_json({"a": args.a, "b": args.b, "same": status == EXIT_OK, "tensors": [d.to_json() for d in diffs],
                    "values": [v.to_json() for v in values]})
        return status
    for d in diffs if args.all else differ:
        print(_line(d))
    for v in values:
        print(f"{v.name}: " + (f"value differs: A {v.a}, B {v.b}" if v.status == "value" else
                               f"only in {'A' if v.status == 'only_a' else 'B'} (a value: {v.a or v.b})"))
    summary = f"{len(diffs) - len(differ)} of {len(diffs)} tensors are the same"
    summary += f"; {len(values)} plain value(s) differ" if values else ""
    print(summary + (": no differences" if status == EXIT_OK else ""))
    return status


def _line(d: TensorDiff) -> str:
    if d.status in ("only_a", "only_b"):
        return f"{d.name}: only in {'A' if d.status == 'only_a' else 'B'}"
    if d.status in ("shape", "dtype"):
        return f"{d.name}: {d.status} differs: A {list(d.a.shape)} {d.a.dtype}, B {list(d.b.shape)} {d.b.dtype}"
    if d.status == "same":
        return f"{d.name}: same"
    return f"{d.name}: values differ: max abs {d.max_abs:.6g}, max rel {d.max_rel:.6g}"
