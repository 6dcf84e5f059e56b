"""Check a checkpoint: the root record, every array's zarr.json, and every inner chunk's crc32c in
every shard object, concurrently. Each bad chunk is reported by key, chunk (object) and inner chunk
index; exit status 1 if any is bad or the checkpoint is incomplete."""

from __future__ import annotations

import argparse

from shardstore.storage import Storage
from shardstore.cli.common import (
    EXIT_FAILED, EXIT_OK, human_bytes, print_json, progress, refuse_other_contents, storage_options,
)
from shardstore.errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError, UnsafeKeyError
from shardstore.verify import DEFAULT_THREADS, verify

NAME = "verify"
HELP = "check every chunk's checksum; exit 1 naming each bad chunk"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the checkpoint")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"objects checked at once (default {DEFAULT_THREADS})")


def run(args: argparse.Namespace) -> int:
    try:
        with progress(None, "verifying") as bar:
            report = verify(args.url, storage_options(args), threads=args.threads, progress=bar.update)
    except CheckpointNotFoundError:
        raise  # nothing there: an input error, not a failed check
    except (IncompleteCheckpointError, CorruptCheckpointError, UnsafeKeyError) as exc:  # a forged path is damage too
        if isinstance(exc, IncompleteCheckpointError):
            refuse_other_contents(Storage(args.url, storage_options(args)), "verify")
        return _unusable(args, exc)
    if args.json:
        print_json(report.to_json())
        return EXIT_OK if report.ok else EXIT_FAILED
    for bad in report.bad:
        chunk = "metadata" if bad.cell is None else f"chunk {list(bad.cell)}" + ("" if bad.inner is None else f" inner chunk {bad.inner}")
        print(f"BAD {bad.name} {chunk}: {bad.problem}")
    verdict = "OK" if report.ok else f"FAILED: {len(report.bad)} bad chunk(s)"
    print(f"{report.url}: {verdict} ({report.tensors} tensors, {report.objects} objects, "
          f"{report.inner_chunks} inner chunks, {human_bytes(report.nbytes)} verified)")
    return EXIT_OK if report.ok else EXIT_FAILED


def _unusable(args: argparse.Namespace, exc: Exception) -> int:
    """An incomplete checkpoint or a damaged root record (one naming a path outside the checkpoint
    among them): the check failed before any chunk."""
    if args.json:
        print_json({"url": args.url, "ok": False, "error": type(exc).__name__, "message": str(exc)})
    else:
        print(f"{args.url}: FAILED: {type(exc).__name__}: {exc}")
    return EXIT_FAILED
