"""Single-process checkpoint benchmark: shardstore against torch.save, safetensors and torch DCP,
measured in the same run on the same state dict (medians of --repeat runs; ratios are what count).

Run: ``python tools/bench_checkpoint.py --gib 1 --tensors 31 --repeat 3 --dir /tmp/bench``
"""

from __future__ import annotations

import argparse
import shutil
import warnings
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from safetensors.torch import load as load_bytes, save_file  # noqa: E402

import shardstore  # noqa: E402


def make_state(gib: float, count: int) -> dict[str, torch.Tensor]:
    per = int(gib * 2**30 / 4 / count)
    cols = 1024
    return {f"layer{i}.weight": torch.randn(max(1, per // cols), cols) for i in range(count)}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def contenders(state: dict, root: Path) -> dict[str, tuple[Callable, Callable]]:
    zeros = {k: torch.empty_like(v) for k, v in state.items()}
    return {
        "shardstore": (
            lambda: shardstore.save(state, str(_fresh(root / "ss"))),
            lambda: shardstore.load(zeros, str(root / "ss")),
        ),
        "shardstore streamed": (  # the same checkpoint, loaded through 256 MiB of staging memory
            lambda: None,
            lambda: shardstore.load(zeros, str(root / "ss"), staging_bytes=256 << 20),
        ),
        "torch.save": (
            lambda: torch.save(state, _fresh(root / "ts.pt")),
            lambda: torch.load(root / "ts.pt", weights_only=True),
        ),
        "safetensors": (
            lambda: save_file(state, str(_fresh(root / "st.safetensors"))),
            lambda: load_bytes((root / "st.safetensors").read_bytes()),  # read it all, as the others do
        ),
        "torch DCP": (
            lambda: dcp.save(state, checkpoint_id=str(_fresh(root / "dcp"))),
            lambda: dcp.load(zeros, checkpoint_id=str(root / "dcp")),
        ),
    }


def timed(fn: Callable, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=31)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/shardstore-bench")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    state = make_state(args.gib, args.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"{len(state)} float32 tensors, {nbytes / 2**30:.2f} GiB, median of {args.repeat} (warm page cache)")
    results = {}
    for name, (save, load) in contenders(state, root).items():
        results[name] = (timed(save, args.repeat), timed(load, args.repeat))
    base_save, base_load = results["shardstore"]
    for name, (s, l) in results.items():
        saved = "(saved above)" if name == "shardstore streamed" else f"{nbytes / 2**30 / s:5.2f} GiB/s ({s / base_save:4.2f}x shardstore's time)"
        print(f"  {name:19} save {saved:40}   load {nbytes / 2**30 / l:5.2f} GiB/s ({l / base_load:4.2f}x)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
