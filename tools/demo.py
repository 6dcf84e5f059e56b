"""The main demo: save on one mesh, load on another, verify in one process.

1. 4 ranks on a (2, 2) mesh build a small model's training state (embedding, MLP, head, AdamW moments,
   step) as DTensors and save it to a Zarr v3 checkpoint, each rank writing its own chunks.
2. 3 ranks on a (3,) mesh load it with different placements (uneven shards), resharding on load.
3. One process with no process group opens it, reads tensors and a slice, and zarr-python reads it too.

Run: ``make demo`` (or ``python tools/demo.py --nproc 4``; under ``torchrun`` the same world size saves
and loads with different meshes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dtensor  # noqa: E402
import shardstore  # noqa: E402
from dtensor import Replicate, Shard  # noqa: E402
from tools.launch import add_launch_args, launch  # noqa: E402

SHAPES = {"embed.weight": (1000, 64), "mlp.up.weight": (256, 64), "mlp.down.weight": (64, 256), "head.weight": (1000, 64), "norm.weight": (64,)}
SAVE_LAYOUT = {"embed.weight": [Shard(0), Shard(1)], "mlp.up.weight": [Replicate(), Shard(0)], "mlp.down.weight": [Replicate(), Shard(1)], "head.weight": [Shard(0), Shard(0)], "norm.weight": [Replicate(), Replicate()]}
LOAD_LAYOUT = {"embed.weight": [Shard(1)], "mlp.up.weight": [Shard(1)], "mlp.down.weight": [Shard(0)], "head.weight": [Replicate()], "norm.weight": [Shard(0)]}


def full_values(step: int) -> dict[str, torch.Tensor]:
    """The training state as full tensors, deterministic so every phase can check against it."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for name, shape in SHAPES.items():
        out[f"model.{name}"] = torch.randn(shape, generator=g).to(torch.bfloat16)
        out[f"optim.{name}.exp_avg"] = torch.randn(shape, generator=g) * 1e-3
        out[f"optim.{name}.exp_avg_sq"] = torch.rand(shape, generator=g) * 1e-6
    return out


def state_dict(mesh, layout: dict, values: dict[str, torch.Tensor], step: int) -> dict:
    def dt(name: str, key: str) -> dtensor.DTensor:
        return dtensor.distribute_tensor(values[key], mesh, layout[name], src_data_rank=None)

    return {
        "model": {name: dt(name, f"model.{name}") for name in SHAPES},
        "optim": {name: {"exp_avg": dt(name, f"optim.{name}.exp_avg"), "exp_avg_sq": dt(name, f"optim.{name}.exp_avg_sq"), "step": step} for name in SHAPES},
        "step": step,
    }


def say(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def save_phase(args) -> None:
    world = dist.get_world_size()
    mesh = dtensor.init_device_mesh(args.device, (2, world // 2) if world % 2 == 0 and world > 1 else (world, 1))
    state = state_dict(mesh, SAVE_LAYOUT, full_values(100), step=100)
    result = shardstore.save(state, args.url, overwrite=True, user_metadata={"demo": True})
    written = [None] * world
    dist.all_gather_object(written, (result.bytes_written, result.chunks_written))
    say(f"[save] {world} ranks, mesh {tuple(mesh.shape)}: wrote {sum(b for b, _ in written) / 2**20:.2f} MiB in "
        f"{sum(c for _, c in written)} chunks ({', '.join(f'rank {r}: {c} chunks' for r, (_, c) in enumerate(written))}) "
        f"in {result.elapsed_s:.2f}s")


def load_phase(args) -> None:
    world = dist.get_world_size()
    mesh = dtensor.init_device_mesh(args.device, (world,))
    zeros = {k: torch.zeros_like(v) for k, v in full_values(100).items()}
    state = state_dict(mesh, LOAD_LAYOUT, zeros, step=0)
    result = shardstore.load(state, args.url)
    expected = full_values(100)
    ok = all(torch.equal(state["model"][n].full_tensor().cpu(), expected[f"model.{n}"]) for n in SHAPES)
    ok &= all(torch.equal(state["optim"][n]["exp_avg"].full_tensor().cpu(), expected[f"optim.{n}.exp_avg"]) for n in SHAPES)
    ok &= state["step"] == 100
    local = {n: tuple(state["model"][n].to_local().shape) for n in ("embed.weight", "norm.weight")}
    say(f"[load] {world} ranks, mesh {tuple(mesh.shape)}, new placements; rank 0 placed {result.bytes_read / 2**20:.2f} MiB (read {result.bytes_fetched / 2**20:.2f}) "
        f"in {result.chunks_read} pieces; rank 0 local shapes {local}; every tensor {'EQUAL' if ok else 'DIFFERENT'}")
    if not ok:
        raise SystemExit("the resharded load differs from what was saved")


def save_and_load(args) -> None:
    save_phase(args)
    load_phase(args)


def verify_phase(url: str) -> None:
    import zarr

    ckpt = shardstore.open(url)
    expected = full_values(100)
    bad = [k for k in ckpt.keys() if not torch.equal(ckpt.read(k), expected[k])]
    part = ckpt.read("model.embed.weight", (slice(10, 20), slice(0, 8)))
    bad += [] if torch.equal(part, expected["model.embed.weight"][10:20, :8]) else ["slice"]
    group = zarr.open_group(url, mode="r")
    via_zarr = torch.from_numpy(group["optim/mlp.up.weight/exp_avg"][...])
    bad += [] if torch.equal(via_zarr, expected["optim.mlp.up.weight.exp_avg"]) else ["zarr-python"]
    meta = ckpt.metadata("model.embed.weight")
    print(f"[verify] 1 process, no process group: {len(ckpt.keys())} tensors checked, a slice read, zarr-python read "
          f"one; model.embed.weight was saved as {meta['dtype']} on mesh {meta['mesh_shape']} {meta['placements']}")
    if bad:
        raise SystemExit(f"verification failed for {bad}")
    print("demo ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_launch_args(parser)
    parser.add_argument("--url", default=str(Path("out") / "demo_checkpoint"), help="where to save (any fsspec URL)")
    args = parser.parse_args()
    torchrun = "RANK" in os.environ
    start = time.perf_counter()
    if torchrun:  # one world size: save and load on different meshes within one process group
        launch(save_and_load, args)
    else:
        launch(save_phase, args)
        args.nproc = max(1, (args.nproc or 4) - 1)  # load on a different number of ranks
        launch(load_phase, args)
    if not torchrun or int(os.environ["RANK"]) == 0:
        verify_phase(args.url)
        print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
