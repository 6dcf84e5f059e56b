"""Redistribute demo: 4 ranks on a 2x2 mesh move a DTensor through several layouts and check every step.

Run: ``python tools/redistribute_demo.py --nproc 4``, or ``torchrun --nproc-per-node 4 tools/redistribute_demo.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

import dtensor  # noqa: E402
from dtensor import Replicate, Shard  # noqa: E402
from tools.launch import add_launch_args, launch  # noqa: E402


def say(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def main(args) -> None:
    world = dist.get_world_size()
    mesh = dtensor.init_device_mesh(args.device, (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    full = torch.randn(10, 6, device=args.device)  # 10 rows do not divide evenly: uneven shards
    dt = dtensor.distribute_tensor(full, mesh, [Shard(0), Shard(1)])
    say(f"mesh {tuple(mesh.shape)} ({world} ranks); global tensor {tuple(full.shape)}")
    layouts = [
        [Shard(0), Shard(0)],
        [Replicate(), Shard(0)],
        [Shard(1), Replicate()],
        [Replicate(), Replicate()],
    ]
    for placements in layouts:
        with CommDebugMode() as comm:
            moved = dt.redistribute(placements=placements)
        counts = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items() if v}
        shapes = [None] * world
        dist.all_gather_object(shapes, tuple(moved.to_local().shape))
        ok = torch.equal(moved.full_tensor(), full)
        say(f"  {str(list(dt.placements)):>22} -> {str(list(placements)):<22} collectives {counts or 'none'}; "
            f"local shapes {shapes}; full tensor {'equal' if ok else 'DIFFERENT'}")
        if not ok:
            raise SystemExit("redistribute produced a wrong tensor")
        dt = moved
    say("demo ok")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_launch_args(parser)
    launch(main, parser.parse_args())
