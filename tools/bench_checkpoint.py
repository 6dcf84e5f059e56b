"""Checkpoint benchmark as users meet it: durable saves and cold same-layout loads in fresh processes.

For each world size (default 1, 2 and 4) and each state, every system saves, then loads back onto the
same layout, each first call in freshly spawned ranks (median over --fresh starts), and the steady state
measured in one set of processes (--repeat). World size 1 is plain tensors in one process without a
process group: shardstore, torch DCP, torch.save and safetensors. Larger worlds hold our DTensors with
Shard(0): shardstore and torch DCP. Also prints the disk's raw O_DIRECT bandwidth from the same run
(measured again before each world size: the tables' "vs raw" use the measurement just before them),
peak RSS per rank and bytes read against bytes needed. How it measures: tools/bench_common.py.

The async case: how long ``shardstore.async_save`` and torch DCP's ``async_save`` (its default stager)
block the caller, each call followed by a mutation of every tensor (the next optimizer step) and a wait
for the commit; first call in fresh ranks, steady = median of the later calls on the same state, beside
each system's synchronous save of the same run; peak RSS of the worst rank during the whole call.
"shardstore, prepared" is the same with ``shardstore.prepare_async_save`` run (untimed) before the first
call, as ``CheckpointManager`` does after a restore or at the first step it does not save.
``--max-staging-mib`` bounds shardstore's staging memory (waves above it).

Run on a quiet machine (needs ~3x --gib of free memory at world size 1, 2x --gib of disk):
    python tools/bench_checkpoint.py                     # 2 GiB, world sizes 1 2 4
    python tools/bench_checkpoint.py --small --json out.json
    python tools/bench_checkpoint.py --gib 1 --worlds 1 2 --fresh 1 --repeat 5   # the async targets
Smoke test (numbers meaningless): python tools/bench_checkpoint.py --gib 0.05 --fresh 1 --repeat 2
Against an object store (one process; see tools/bench_bucket.py): --url s3://bucket/prefix
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_common import PREPARED, SYSTEMS, Job, checkpoint_path, measure, remove, systems_for  # noqa: E402
from tools.bench_state import MIB, Layout, State  # noqa: E402
from tools.bench_report import METHOD, Report, add_common_args, positive_int, raw_bandwidth, states  # noqa: E402


def run_world(report: Report, args: argparse.Namespace, state: State, world: int) -> None:
    """Save, same-layout load and async save of ``state`` on ``world`` ranks, every system, three tables."""
    layout = Layout(world, None if world == 1 else 0)
    saves, loads, stalls = {}, {}, {}
    budget = None if args.max_staging_mib is None else args.max_staging_mib * MIB
    for system in systems_for(layout):
        job = Job(system, "save", state, layout, checkpoint_path(args.dir, system), repeats=1, max_staging_bytes=budget)
        saves[system] = measure(job, args.fresh, args.repeat)
        loads[system] = measure(replace(job, op="load"), args.fresh, args.repeat)
        if SYSTEMS[system].async_save is not None and not args.no_async:
            stalls[system] = measure(replace(job, op="async_save"), args.fresh, args.repeat)
        if SYSTEMS[system].prepare_async is not None and not args.no_async:
            stalls[system + PREPARED] = measure(replace(job, op="async_save", prepared=True), args.fresh, args.repeat)
        remove(job.path)
    baselines = ["torch DCP"] + (["torch.save", "safetensors"] if layout.shard_dim is None else [])
    report.case(f"durable save, world size {world}", "save", state, layout, saves, baselines)
    report.case(f"cold same-layout load, world size {world}", "load", state, layout, loads, baselines)
    if stalls:
        report.stall_case(f"async save, time the caller is blocked, world size {world}", state, layout, stalls, saves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--worlds", type=positive_int, nargs="+", default=[1, 2, 4],
                        help="world sizes; 1 is plain tensors without a process group (default 1 2 4)")
    parser.add_argument("--url", help="an object-store URL (s3://bucket/prefix): run tools/bench_bucket.py there")
    parser.add_argument("--no-async", action="store_true", help="skip the async save case")
    parser.add_argument("--max-staging-mib", type=positive_int, default=None,
                        help="shardstore async_save's max_staging_bytes, MiB (default: no bound)")
    args = parser.parse_args()
    if args.url:
        from tools.bench_bucket import run

        return run(args.url, args.gib, args.repeat)
    chosen = states(parser, args)
    nbytes = max(s.nbytes for s in chosen)
    report = Report(args, raw_bandwidth(args.dir, nbytes))
    report.header(METHOD)
    try:
        for i, (state, world) in enumerate((state, world) for state in chosen for world in args.worlds):
            if i:
                report.remeasure_raw(args.dir, nbytes)
            run_world(report, args, state, world)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    report.write_json(args.json)


if __name__ == "__main__":
    main()
