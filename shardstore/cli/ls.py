"""List the checkpoints (step-<N>) under a run directory: step, size, time, and whether complete,
incomplete (no root record: a save was cut short or is running) or unreadable (a root record that does not
read: damaged, or of a newer format)."""

from __future__ import annotations

import argparse
import datetime

from shardstore.cli.common import EXIT_OK, human_bytes, print_json, progress, storage_options
from shardstore.runs import StepSummary, summarize

NAME = "ls"
HELP = "list the step-<N> checkpoints under a run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="the run directory holding step-<N> checkpoints")


def run(args: argparse.Namespace) -> int:
    with progress(None, "listing steps", unit="step") as bar:
        steps = summarize(args.root, storage_options(args), progress=bar.update)
    if args.json:
        print_json([s.to_json() for s in steps])
        return EXIT_OK
    print(f"{'STEP':>10}  {'SIZE':>10}  {'OBJECTS':>8}  {'TIME (UTC)':19}  STATE")
    for s in steps:
        print(f"{s.step:>10}  {human_bytes(s.nbytes):>10}  {s.objects:>8}  {_time(s):19}  {_state(s)}")
    for s in steps:
        if s.problem is not None:
            print(f"step {s.step}: {s.problem}")
    if not steps:
        print(f"(no step-<N> checkpoints under {args.root})")
    return EXIT_OK


def _state(s: StepSummary) -> str:
    return "complete" if s.complete else "INCOMPLETE" if s.problem is None else "UNREADABLE"


def _time(s: StepSummary) -> str:
    if s.modified is None:
        return "-"
    return datetime.datetime.fromtimestamp(s.modified, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
