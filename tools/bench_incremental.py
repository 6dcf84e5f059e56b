"""Incremental saves: how long the second save of a mostly frozen state takes next to the first.

A fine-tuning state of ``--mib`` MiB (float32 tensors of 1024 columns), ``--frozen`` of its bytes in
frozen tensors (the first ones; the trainable ones come last, so nothing overlaps their writes), is
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


def build(mib: int, frozen: float) -> tuple[dict, list[str]]:
    """The state (tensors of about 16 MiB) and the names of its trainable tensors."""
    count = max(2, round(mib / _TENSOR_MIB))
    rows = mib * 2**20 // (count * 1024 * 4)
    trainable = max(1, round(count * (1 - frozen)))
    state = {f"w{i}": torch.randn(rows, 1024) for i in range(count)}
    return state, [f"w{i}" for i in range(count - trainable, count)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_once(root: Path, mib: int, frozen: float) -> tuple[float, float, float, str]:
    """One round: (plain, first, second) seconds and a line describing the state."""
    shutil.rmtree(root, ignore_errors=True)
    state, trainable = build(mib, frozen)
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
    return plain, first, second, f"state {nbytes / 2**30:.2f} GiB, {share:.0%} frozen ({len(state) - len(trainable)} of {len(state)} tensors)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--frozen", type=float, default=0.9)
    parser.add_argument("--dir", default="out/bench-incremental")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    rounds = []
    for _ in range(args.repeat):
        *times, described = run_once(Path(args.dir), args.mib, args.frozen)
        rounds.append(times)
        print("round: plain {:.2f} s, first {:.2f} s, second {:.2f} s".format(*times), flush=True)
    plain, first, second = (statistics.median(column) for column in zip(*rounds))
    ratio = statistics.median(s / f for _, f, s in rounds)
    print(described + (f", medians of {args.repeat} rounds" if args.repeat > 1 else ""))
    print(f"plain save (no hashing)      {plain:6.2f} s")
    print(f"manager, first save          {first:6.2f} s")
    print(f"manager, incremental second  {second:6.2f} s  = {ratio:.2f} x the first (median ratio), {second / plain:.2f} x the plain save")


if __name__ == "__main__":
    main()
