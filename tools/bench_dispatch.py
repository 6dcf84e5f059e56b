"""Per-op dispatch overhead of our DTensor against torch's DTensor, in the same run.

Small tensors, so the time is almost all dispatch (sharding propagation, wrapping); steady state, after
the caches are warm. Prints microseconds per op (median of --repeat rounds) and the ratio.

Run: ``python tools/bench_dispatch.py --nproc 2``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.tensor as tdt  # noqa: E402

import dtensor  # noqa: E402
from tools.launch import add_launch_args, launch  # noqa: E402

OPS = {
    "add": lambda a, b: a + b,
    "mul_": lambda a, b: a.mul_(1.0),
    "mm (colwise)": lambda a, b: a @ b,
    "sum(dim)": lambda a, b: a.sum(dim=1),
    "view+transpose": lambda a, b: a.view(4, 2, 16).transpose(0, 1),
}


def per_op_us(fn, a, b, iters: int, repeat: int) -> float:
    for _ in range(20):
        fn(a, b)
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(iters):
            fn(a, b)
        rounds.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(rounds)


def main_rank(args) -> None:
    warnings.filterwarnings("ignore")
    mesh = dtensor.init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    a_full, w_full = torch.randn(8, 16), torch.randn(16, 16)
    ours = (dtensor.distribute_tensor(a_full, mesh, [dtensor.Replicate()]), dtensor.distribute_tensor(w_full, mesh, [dtensor.Shard(1)]))
    theirs = (tdt.distribute_tensor(a_full, mesh, [tdt.Replicate()]), tdt.distribute_tensor(w_full, mesh, [tdt.Shard(1)]))
    rows = []
    for name, fn in OPS.items():
        b_ours, b_theirs = (ours[1], theirs[1]) if "mm" in name else (ours[0], theirs[0])
        us_ours = per_op_us(fn, ours[0], b_ours, args.iters, args.repeat)
        us_theirs = per_op_us(fn, theirs[0], b_theirs, args.iters, args.repeat)
        rows.append((name, us_ours, us_theirs))
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} ranks, steady state, median of {args.repeat} rounds of {args.iters} calls")
        for name, o, t in rows:
            print(f"  {name:16} ours {o:7.1f} us   torch {t:7.1f} us   ours/torch {o / t:4.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_launch_args(parser)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    launch(main_rank, args)


if __name__ == "__main__":
    main()
