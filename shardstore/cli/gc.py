"""Delete old and incomplete checkpoints under a run directory, keeping the newest N complete ones.

Never deletes the newest complete step; an incomplete step newer than every complete one may be a save
still running and is spared, as is an older one a save has claimed (object stores); a step whose root
record does not read (damaged, or of a newer format), that holds files no shardstore save writes, or
whose commit lock stays held for a second, is kept and reported. --dry-run shows what would go."""

from __future__ import annotations

import argparse

from shardstore.cli.common import EXIT_OK, print_json, progress, storage_options
from shardstore.runs import collect

NAME = "gc"
HELP = "delete old and incomplete step-<N> checkpoints, keeping the newest N complete ones"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="the run directory holding step-<N> checkpoints")
    parser.add_argument("--keep", type=int, required=True, metavar="N", help="complete steps to keep (>= 1)")
    parser.add_argument("--dry-run", action="store_true", help="only show what would be deleted")


def run(args: argparse.Namespace) -> int:
    with progress(None, "deleting steps", unit="step") as bar:
        plan = collect(args.root, args.keep, storage_options(args), dry_run=args.dry_run, progress=bar.update)
    if args.json:
        print_json(plan.to_json() | {"dry_run": args.dry_run})
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for entry in plan.delete:
        print(f"{verb} step {entry.step} ({'complete' if entry.complete else 'incomplete'}): {entry.url}")
    for entry in plan.spared:
        print(f"kept step {entry.step}: incomplete but newer than every complete step (a save may be running)")
    for entry in plan.claimed:
        print(f"kept step {entry.step}: incomplete, but a save claimed it and may still be writing it; "
              "delete it by hand if no save is running")
    for entry in plan.locked:
        print(f"kept step {entry.step}: its commit lock {entry.url}.lock is held (a save committing to it or a "
              f"deletion at work; on an object store maybe a lock a killed process left, which "
              f"`shardstore unlock {entry.url}` removes)")
    for entry in plan.unreadable:
        print(f"kept step {entry.step}: {entry.problem} — not deleted; check it with `shardstore verify "
              f"{entry.url}`, then repair or move it by hand")
    print(f"kept {len(plan.keep)} complete step(s): {[e.step for e in plan.keep]}; {verb} {len(plan.delete)}")
    return EXIT_OK
