"""Resharded-load benchmark: save on N ranks with Shard(0), load on M ranks with Shard(1), shardstore
against torch DCP in the same run. DCP reads whole saved items and narrows them (pytorch issue 76331);
shardstore reads only the inner chunks each rank needs. Prints medians, bytes read per rank, ratios.

Run: ``python tools/bench_reshard.py --save-ranks 2 --load-ranks 4 --gib 0.5``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

import dtensor  # noqa: E402
import shardstore  # noqa: E402
from dtensor import Shard  # noqa: E402
from tools.launch import add_launch_args, launch  # noqa: E402

COLS = 4096


def state(mesh, placements, gib: float, tensors: int, fill: bool) -> dict:
    rows = max(1, int(gib * 2**30 / 4 / tensors / COLS))
    make = dtensor.ones if fill else dtensor.zeros
    return {f"w{i}": make(rows, COLS, device_mesh=mesh, placements=placements) for i in range(tensors)}


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def save_main(args) -> None:
    warnings.filterwarnings("ignore")
    mesh = dtensor.init_device_mesh("cpu", (dist.get_world_size(),))
    sd = state(mesh, [Shard(0)], args.gib, args.tensors, fill=True)
    shardstore.save(sd, f"{args.dir}/ss", overwrite=True)
    dcp.save(sd, checkpoint_id=f"{args.dir}/dcp")


def load_main(args) -> None:
    warnings.filterwarnings("ignore")
    mesh = dtensor.init_device_mesh("cpu", (dist.get_world_size(),))
    sd = state(mesh, [Shard(1)], args.gib, args.tensors, fill=False)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    results = {}
    read = 0
    for name, fn in (("shardstore", lambda: shardstore.load(sd, f"{args.dir}/ss")), ("torch DCP", lambda: dcp.load(sd, checkpoint_id=f"{args.dir}/dcp"))):
        results[name] = statistics.median(_timed(fn) for _ in range(args.repeat))
    read = shardstore.load(sd, f"{args.dir}/ss").bytes_read
    if dist.get_rank() == 0:
        print(f"{args.tensors} float32 tensors, {nbytes / 2**30:.2f} GiB; saved Shard(0) on {args.save_ranks} ranks, "
              f"loaded Shard(1) on {dist.get_world_size()} ranks; median of {args.repeat}")
        print(f"  shardstore: rank 0 read {read / 2**20:.0f} MiB of the {nbytes / dist.get_world_size() / 2**20:.0f} MiB it holds")
        for name, t in results.items():
            print(f"  {name:10} load {nbytes / 2**30 / t:5.2f} GiB/s ({t / results['shardstore']:.2f}x shardstore's time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_launch_args(parser)
    parser.add_argument("--save-ranks", type=int, default=2)
    parser.add_argument("--load-ranks", type=int, default=4)
    parser.add_argument("--gib", type=float, default=0.5)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/shardstore-bench-reshard")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.nproc = args.save_ranks
    launch(save_main, args)
    args.nproc = args.load_ranks
    launch(load_main, args)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
