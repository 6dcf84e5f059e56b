"""Incremental saves: how long the second save of a mostly frozen state takes next to the first.

A fine-tuning state of ``--mib`` MiB (float32 tensors of 1024 columns), ``--frozen`` of its bytes in
frozen tensors (the first ones; the trainable ones come last, so nothing overlaps their writes; with
``--spread`` they sit evenly among the frozen ones, as adapters beside their layers), is
saved through a ``CheckpointManager`` twice, the trainable tensors changed between the saves. The first
save hashes (BLAKE3, before encoding) and writes everything; the second hashes everything, links the
unchanged objects (hard links here) and encodes and writes only the changed ones. A plain
``shardstore.save`` of the same state (no hashing) is timed beside them. Every save is durable
(fsync'd). One process, no process group. ``--repeat N`` runs it all N times and prints the medians
(on a shared machine, compare ratios).

Run: ``python tools/bench_incremental.py --mib 1024 --frozen 0.9 --dir /tmp/bench-incremental``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import shardstore  # noqa: E402

_TENSOR_MIB = 16


def build(mib: int, frozen: float, spread: bool = False) -> tuple[dict, list[str]]:
    """The state (tensors of about 16 MiB) and the names of its trainable tensors: the last ones, or
    ``spread`` evenly among the frozen ones (as adapters sit beside the layers they adapt)."""
    count = max(2, round(mib / _TENSOR_MIB))
    rows = mib * 2**20 // (count * 1024 * 4)
    trainable = max(1, round(count * (1 - frozen)))
    state = {f"w{i}": torch.randn(rows, 1024) for i in range(count)}
    picked = [count * (j + 1) // trainable - 1 for j in range(trainable)] if spread else range(count - trainable, count)
    return state, [f"w{i}" for i in picked]


def timed(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (every thread of this process) that ``fn()`` took. On a shared
    machine the CPU time is the steadier measure of the work a save does."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_once(root: Path, mib: int, frozen: float, spread: bool) -> tuple[list[tuple[float, float]], str]:
    """One round: (wall, cpu) seconds of the plain, first and second saves, and a line describing the state."""
    shutil.rmtree(root, ignore_errors=True)
    state, trainable = build(mib, frozen, spread)
    nbytes = sum(t.nbytes for t in state.values())
    plain = timed(lambda: shardstore.save(state, str(root / "plain")))
    manager = shardstore.CheckpointManager(str(root / "run"), async_save=False)
    first = timed(lambda: manager.save(1, state))
    for name in trainable:
        state[name].add_(1.0)
    second = timed(lambda: manager.save(2, state))
    manager.close()
    shutil.rmtree(root, ignore_errors=True)
    share = 1 - sum(state[n].nbytes for n in trainable) / nbytes
    return [plain, first, second], f"state {nbytes / 2**30:.2f} GiB, {share:.0%} frozen ({len(state) - len(trainable)} of {len(state)} tensors)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--frozen", type=float, default=0.9)
    parser.add_argument("--dir", default="out/bench-incremental")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--spread", action="store_true", help="trainable tensors spread among the frozen ones, not last")
    args = parser.parse_args()
    rounds = []
    for _ in range(args.repeat):
        saves, described = run_once(Path(args.dir), args.mib, args.frozen, args.spread)
        rounds.append(saves)
        print("round: " + ", ".join(f"{name} {w:.2f} s (cpu {c:.2f} s)" for name, (w, c) in zip(_NAMES, saves)), flush=True)
    print(described + (f", medians of {args.repeat} rounds" if args.repeat > 1 else ""))
    for i, label in enumerate(("plain save (no hashing)", "manager, first save", "manager, incremental second")):
        wall, cpu = (statistics.median(r[i][k] for r in rounds) for k in (0, 1))
        print(f"{label:28s} {wall:6.2f} s  cpu {cpu:6.2f} s")
    wall_ratio, cpu_ratio = (statistics.median(r[2][k] / r[1][k] for r in rounds) for k in (0, 1))
    print(f"second / first (median ratio): wall {wall_ratio:.2f} x, cpu {cpu_ratio:.2f} x")


_NAMES = ("plain", "first", "second")


if __name__ == "__main__":
    main()
