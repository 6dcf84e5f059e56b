"""Offline reshard benchmark (``shardstore reshard``): one big float32 tensor saved Shard(0) on
--save-ranks ranks (default 8), rewritten for --placements on --mesh under --budget-gib, against a naive
rewrite in the same run: read the whole tensor into memory, then write the same target layout with the
same writer (so the difference is the streaming alone). Each rewrite runs in a fresh process, the source evicted from
the page cache first; peak RSS growth is the process's VmHWM (reset once imports are done) minus its RSS
just before the call. Prints time, GiB/s, peak RSS growth and the naive/streamed ratios.

Full size (a quiet machine; the naive rewrite holds about twice the tensor in memory, the disk three copies):
    python tools/bench_reshard.py offline --tensor-gib 4 --budget-gib 1
Smoke run (numbers meaningless): python tools/bench_reshard.py offline --tensor-gib 0.25 --budget-gib 0.0625
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dtensor.placements import Shard  # noqa: E402
from shardstore.writer import ArraySpec, plan_layout, tree_of, write_checkpoint  # noqa: E402
from tools.bench_common import _reset_peak, _status, evict, remove  # noqa: E402

KEY = ("w",)
COLUMNS = 4096
GIB = 1 << 30


def make_source(path: str, nbytes: int, save_ranks: int) -> tuple[int, int]:
    """A checkpoint of one (rows, COLUMNS) float32 tensor laid out as Shard(0) on ``save_ranks`` ranks
    would save it, written cell by cell from seeded values (never whole in memory). Its shape."""
    shape = (max(save_ranks, nbytes // (4 * COLUMNS)), COLUMNS)
    spec = ArraySpec(KEY, shape, torch.float32, (save_ranks,), (Shard(0),))

    def values(key, box) -> torch.Tensor:
        g = torch.Generator().manual_seed(box.offsets[0])
        return torch.randn(box.sizes, generator=g)

    write_checkpoint(path, plan_layout([spec], 256 << 20), values, tree_of([KEY]), threads=1)
    return shape


def rewrite(mode: str, src: str, dst: str, mesh: tuple[int, ...], placements: str, budget: int) -> None:
    """What one measured process does: ``reshard`` (streamed), or ``naive`` (whole tensor, then write)."""
    from shardstore.reshard import parse_rules, reshard, target_specs  # noqa: PLC0415 - imported before the reset

    rules = parse_rules([placements], len(mesh))
    if mode == "reshard":
        reshard(src, dst, mesh, rules, memory_budget=budget)
        return
    import shardstore  # noqa: PLC0415

    ckpt = shardstore.open(src, max_read_bytes=1 << 62)
    whole = ckpt.read("w")
    specs = target_specs({"w": (KEY, tuple(whole.shape), whole.dtype)}, mesh, rules)

    def cell(key, box) -> torch.Tensor:
        return whole[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))].contiguous()

    write_checkpoint(dst, plan_layout(specs, budget // 3), cell, ckpt.tree, threads=4)


def child(argv: list[str]) -> None:
    mode, src, dst, mesh, placements, budget = argv
    import shardstore.reshard  # noqa: F401, PLC0415 - imports are not what is measured

    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    rewrite(mode, src, dst, tuple(int(n) for n in mesh.split(",")), placements, int(budget))
    print(json.dumps({"seconds": time.perf_counter() - start, "grew": _status("VmHWM") - before}))


def measure(mode: str, src: str, dst: str, args: argparse.Namespace) -> dict:
    evict(src)
    argv = [mode, src, dst, args.mesh, args.placements, str(int(args.budget_gib * GIB))]
    done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr}")
    remove(dst)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, runs: list[dict], nbytes: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    grew = max(r["grew"] for r in runs)
    print(f"{name:<28} {seconds:8.2f} s {nbytes / GIB / seconds:8.2f} GiB/s   peak RSS growth {grew / (1 << 20):8.0f} MiB")
    return {"seconds": seconds, "grew": grew}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-gib", type=float, default=4.0, help="size of the tensor, GiB (default 4)")
    parser.add_argument("--budget-gib", type=float, default=1.0, help="reshard --memory-budget, GiB (default 1)")
    parser.add_argument("--save-ranks", type=int, default=8,
                        help="ranks of the saved Shard(0) layout (default 8; writing it holds one shard in memory)")
    parser.add_argument("--mesh", default="16", help="target mesh shape, e.g. 16 or 4,4 (default 16)")
    parser.add_argument("--placements", default="Shard(1)", help="target placements (default Shard(1))")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each rewrite; the median time (default 1)")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (deleted at the end)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shardstore-bench-", dir=args.dir) as tmp:
        src, dst = f"{tmp}/src", f"{tmp}/dst"
        shape = make_source(src, int(args.tensor_gib * GIB), args.save_ranks)
        nbytes = math.prod(shape) * 4
        print(f"tensor float32{list(shape)} ({nbytes / GIB:.2f} GiB) saved Shard(0) on {args.save_ranks} ranks -> "
              f"{args.placements} on mesh {args.mesh}, budget {args.budget_gib:g} GiB")
        runs = {mode: [measure(mode, src, dst, args) for _ in range(args.repeat)] for mode in ("reshard", "naive")}
        streamed = report("shardstore reshard", runs["reshard"], nbytes)
        naive = report("naive (whole tensor, write)", runs["naive"], nbytes)
    print(f"naive / reshard: time {naive['seconds'] / streamed['seconds']:.2f}x, "
          f"peak RSS growth {naive['grew'] / max(1, streamed['grew']):.2f}x; "
          f"reshard peak RSS growth / budget {streamed['grew'] / (args.budget_gib * GIB):.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
