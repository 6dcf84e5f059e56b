"""Resharding-load benchmark as users meet it: a checkpoint saved with Shard(0) on --save-ranks ranks,
loaded cold in fresh processes onto the same layout and onto Shard(--load-dim) on --load-ranks ranks.

shardstore against torch DCP in the same run, both from checkpoints saved (untimed here) by the same
ranks. DCP reads whole saved items and narrows them (pytorch issue 76331); shardstore reads only the
inner chunks each rank needs: the read/needed column shows it. Each first load runs in freshly spawned
ranks (median over --fresh starts), the steady state in one set of processes (--repeat). Also prints the
disk's raw O_DIRECT bandwidth from the same run and peak RSS per rank. How it measures: tools/bench_common.py.

Run on a quiet machine:
    python tools/bench_reshard.py                         # 2 GiB, Shard(0) on 2 -> Shard(1) on 4
    python tools/bench_reshard.py --small --json out.json
Smoke test (numbers meaningless): python tools/bench_reshard.py --gib 0.05 --fresh 1 --repeat 2

The offline rewrite (``shardstore reshard``: a 4 GiB tensor under a 1 GiB budget, against a naive
whole-tensor rewrite): ``python tools/bench_reshard.py offline --tensor-gib 4 --budget-gib 1``
(tools/bench_offline_reshard.py; ``offline --help`` lists its options).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_common import Job, checkpoint_path, measure, remove, systems_for  # noqa: E402
from tools.bench_state import Layout, State  # noqa: E402
from tools.bench_report import METHOD, Report, add_common_args, positive_int, raw_bandwidth, states  # noqa: E402


def run_state(report: Report, args: argparse.Namespace, state: State) -> None:
    """Save ``state`` once per system, then measure both loads: same layout, then resharded."""
    saved = Layout(args.save_ranks, 0)
    targets = [("cold same-layout load", saved), ("cold resharded load", Layout(args.load_ranks, args.load_dim))]
    systems = systems_for(saved)
    jobs = {s: Job(s, "save", state, saved, checkpoint_path(args.dir, s), repeats=1) for s in systems}
    for job in jobs.values():
        measure(job, fresh=1, repeat=1)
    for title, layout in targets:
        loads = {s: measure(replace(job, op="load", layout=layout), args.fresh, args.repeat) for s, job in jobs.items()}
        report.case(f"{title} (saved {saved.describe()})", "load", state, layout, loads, ["torch DCP"])
    for job in jobs.values():
        remove(job.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--save-ranks", type=positive_int, default=2, help="ranks saving with Shard(0) (default 2)")
    parser.add_argument("--load-ranks", type=positive_int, default=4, help="ranks of the resharded load (default 4)")
    parser.add_argument("--load-dim", type=int, default=1, choices=[0, 1],
                        help="tensor dim the resharded load shards (default 1)")
    args = parser.parse_args()
    chosen = states(parser, args)
    nbytes = max(s.nbytes for s in chosen)
    report = Report(args, raw_bandwidth(args.dir, nbytes))
    report.header(METHOD)
    try:
        for i, state in enumerate(chosen):
            if i:
                report.remeasure_raw(args.dir, nbytes)
            run_state(report, args, state)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    report.write_json(args.json)


if __name__ == "__main__":
    if sys.argv[1:2] == ["offline"]:
        from tools.bench_offline_reshard import main as offline

        offline(sys.argv[2:])
    else:
        main()
