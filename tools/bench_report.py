"""What the checkpoint benchmarks report: the machine, its raw disk bandwidth measured in the same run,
one table per case, and every number as JSON (``--json PATH``).

Ratios measured side by side in one run are what count: absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import safetensors
import torch

from shardstore.buffers import staging_buffer
from tools.bench_common import PREPARED, Measurement, Record, evict, remove
from tools.bench_state import GIB, MIB, Layout, State, mixed_state, small_state

BLOCK = 64 * MIB  # the raw disk measurement's aligned, reused write buffer
READ_PIECE = 4 * MIB  # its reads: this size, READ_THREADS at once, as shardstore's cold reads go
READ_THREADS = 16


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gib", type=float, default=2.0,
                        help="size of the mixed state (fp32/bf16 tensors of 1-256 MiB), GiB (default 2)")
    parser.add_argument("--small", action="store_true",
                        help="also run the small-tensor state (--small-tensors tensors of 64 KiB-1 MiB)")
    parser.add_argument("--small-tensors", type=positive_int, default=1000, help="tensors in the small state (default 1000)")
    parser.add_argument("--fresh", type=positive_int, default=3,
                        help="fresh starts of new ranks per measurement; the first call's median (default 3)")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="calls in the last start's processes; steady state = median after the first (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of tensor sizes, dtypes and values (default 0)")
    parser.add_argument("--dir", default="/tmp/shardstore-bench",
                        help="where checkpoints are written (deleted at the end); its filesystem is what is measured")
    parser.add_argument("--json", metavar="PATH", help="also write every number (every rank, every call) here")


def states(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[State]:
    """The states asked for: the mixed one unless --gib is 0, the small one with --small."""
    chosen = [mixed_state(args.gib, args.seed)] if args.gib > 0 else []
    chosen += [small_state(args.small_tensors, args.seed + 1)] if args.small else []
    if not chosen:
        parser.error("nothing to measure: pass --gib above 0, or --small")
    return chosen


# --- the machine ------------------------------------------------------------------------------------

def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def _filesystem(path: str) -> str:
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        mounts = [line.split()[:3] for line in f]
    device, mount, kind = max((m for m in mounts if path.startswith(m[1].rstrip("/") + "/") or path == m[1]),
                              key=lambda m: len(m[1]))
    return f"{kind} ({device} on {mount})"


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def machine(directory: str) -> dict:
    return {
        "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(_mem_total() / GIB, 1), "filesystem": _filesystem(directory),
        "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
        "safetensors": safetensors.__version__, "commit": _commit(),
    }


# --- raw disk bandwidth -----------------------------------------------------------------------------

def _buffer(nbytes: int):
    """A page-aligned buffer (O_DIRECT needs alignment) on huge pages where the OS has them (with 4 KiB
    pages a request carries at most ~1 MiB here, and both directions ran at about half the speed),
    touched now so no timer pays for fresh pages: shardstore's own ``staging_buffer``."""
    buf = staging_buffer(nbytes)
    memoryview(buf)[:] = os.urandom(nbytes)
    return buf


def _direct_write(path: str, blocks: int) -> float:
    buf = _buffer(BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(blocks):
            if os.write(fd, buf) != BLOCK:
                raise OSError(f"short O_DIRECT write to {path}")
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _direct_read(path: str, blocks: int) -> float:
    evict(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

    pieces = blocks * BLOCK // READ_PIECE

    def read_every_nth(first: int, buf) -> None:
        for index in range(first, pieces, READ_THREADS):
            if os.preadv(fd, [buf], index * READ_PIECE) != READ_PIECE:
                raise OSError(f"short O_DIRECT read from {path}")

    try:
        buffers = [_buffer(READ_PIECE) for _ in range(READ_THREADS)]
        start = time.perf_counter()
        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(read_every_nth, range(READ_THREADS), buffers))
        return time.perf_counter() - start
    finally:
        os.close(fd)


def raw_bandwidth(directory: str, nbytes: int) -> dict:
    """The disk's O_DIRECT sequential write (aligned reused buffer, fsync'd) and cold O_DIRECT read
    (READ_THREADS threads) bandwidth for ``nbytes`` (rounded up to whole BLOCKs), in GiB/s; None where
    the filesystem refuses O_DIRECT (tmpfs)."""
    os.makedirs(directory, exist_ok=True)
    path, blocks = os.path.join(directory, "raw-o_direct.bin"), max(1, -(-nbytes // BLOCK))
    try:
        write_s = _direct_write(path, blocks)
        read_s = _direct_read(path, blocks)
    except OSError as exc:
        return {"write_gib_s": None, "read_gib_s": None, "note": f"O_DIRECT refused in {directory}: {exc}"}
    finally:
        remove(path)
    size = blocks * BLOCK / GIB
    return {"write_gib_s": size / write_s, "read_gib_s": size / read_s, "gib": size}


# --- tables and JSON --------------------------------------------------------------------------------

def _rate(nbytes: int, seconds: float | None) -> float | None:
    return nbytes / GIB / seconds if seconds else None


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _steady(m: Measurement | None) -> float | None:
    return None if m is None else m.steady_s


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _worst_memory(records: list[Record]) -> str:
    """The rank whose RSS grew most during its first call: held bytes, RSS before, peak (MiB)."""
    r = max(records, key=lambda r: r.peak - r.rss_before)
    return f"{r.held // MIB}/{r.rss_before // MIB}/{r.peak // MIB}"


def _worst_read(records: list[Record]) -> str:
    """Bytes read against bytes needed (the rank's targets), worst rank: read calls, disk, self-reported."""
    parts = [("rchar", [r.rchar / r.held for r in records if r.held]),
             ("disk", [r.disk_read / r.held for r in records if r.held]),
             ("reported", [r.reported_read / r.held for r in records if r.held and r.reported_read is not None])]
    return " ".join(f"{name} {max(values):.2f}x" for name, values in parts if values)


def _raw_line(title: str, raw: dict) -> str:
    return raw.get("note") or (
        f"{title} ({raw['gib']:.2f} GiB): O_DIRECT sequential write {raw['write_gib_s']:.2f} GiB/s (reused "
        f"{BLOCK // MIB} MiB buffer on huge pages, fsync'd); cold read {raw['read_gib_s']:.2f} GiB/s (O_DIRECT, "
        f"{READ_THREADS} threads x {READ_PIECE // MIB} MiB)")


class Report:
    """Prints the header and one table per case as results arrive; keeps every number for ``--json``."""

    def __init__(self, args: argparse.Namespace, raw: dict) -> None:
        self.raw = raw
        self.payload = {"command": sys.argv, "machine": machine(args.dir), "raw_disk": raw, "cases": []}

    def header(self, method: str) -> None:
        m = self.payload["machine"]
        print(f"command: python {' '.join(sys.argv)}")
        print(f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB memory, "
              f"checkpoints on {m['filesystem']}, load average {' '.join(f'{x:.2f}' for x in m['load_average'])}")
        print(f"software: Python {m['python']}, torch {m['torch']}, safetensors {m['safetensors']}, "
              f"shardstore at {m['commit']}")
        print(method)
        print(_raw_line("raw disk, same run", self.raw), flush=True)

    def remeasure_raw(self, directory: str, nbytes: int) -> None:
        """Measure the disk again for the cases that follow (their "vs raw" ratios use it): a shared or
        burst-limited disk drifts within a run (this project's 2-core machine: a 3.36 GiB/s raw write at
        the start of one hour, 1.5 GiB/s at its end), and a ratio against the run's first measurement
        would then say more about the disk's moment than about the system."""
        self.raw = raw_bandwidth(directory, nbytes)
        self.payload.setdefault("raw_disk_later", []).append(self.raw)
        print("\n" + _raw_line("raw disk measured again, for the tables below", self.raw), flush=True)

    def case(self, title: str, op: str, state: State, layout: Layout, results: dict[str, Measurement],
             baselines: list[str]) -> None:
        raw = self.raw["write_gib_s" if op == "save" else "read_gib_s"]
        rates = {name: (_rate(state.nbytes, m.first_s), _rate(state.nbytes, m.steady_s)) for name, m in results.items()}
        heads = ["system", "first GiB/s", "steady GiB/s"] + [f"vs {b} first/steady" for b in baselines]
        heads += [f"vs raw {'write' if op == 'save' else 'read'}", "RSS MiB held/before/peak"]
        heads += ["read/needed"] if op != "save" else []
        rows = [self._row(name, rates, baselines, raw, results[name], op) for name in results]
        widths = [max(len(str(c)) for c in column) for column in zip(heads, *rows)]
        print(f"\n{title}: {state.title}, {state.nbytes / GIB:.2f} GiB; {layout.describe()}")
        for row in [heads] + rows:
            print("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        sys.stdout.flush()
        self._keep(title, op, state, layout, results, rates)

    @staticmethod
    def _row(name: str, rates: dict, baselines: list[str], raw: float | None, m: Measurement, op: str) -> list[str]:
        first, steady = rates[name]
        row = [name, _fmt(first), _fmt(steady)]
        for base in baselines:
            b_first, b_steady = rates.get(base, (None, None))
            row.append(f"{_fmt(_ratio(first, b_first), suffix='x')}/{_fmt(_ratio(steady, b_steady), suffix='x')}")
        row += [_fmt(_ratio(first, raw), suffix="x"), _worst_memory(m.first_calls())]
        return row + ([_worst_read(m.first_calls())] if op != "save" else [])

    def _keep(self, title, op, state, layout, results, rates) -> None:
        self.payload["cases"].append({
            "title": title, "op": op, "layout": asdict(layout), "raw_disk": self.raw,
            "state": {"title": state.title, "bytes": state.nbytes, "tensors": len(state.specs), "seed": state.seed},
            "systems": {name: {"first_s": m.first_s, "steady_s": m.steady_s, "first_gib_s": rates[name][0],
                               "steady_gib_s": rates[name][1],
                               "starts": [[[asdict(r) for r in ranks] for ranks in start] for start in m.starts]}
                        for name, m in results.items()},
        })

    def stall_case(self, title: str, state: State, layout: Layout, stalls: dict[str, Measurement],
                   sync: dict[str, Measurement]) -> None:
        """How long each system's async save blocks the caller, against its own synchronous save."""
        heads = ["system", "first stall s", "steady stall s", "stall / sync save (steady)", "until committed s",
                 "RSS MiB held/before/peak"]
        rows = [[name, _fmt(m.first_s, ".3f"), _fmt(m.steady_s, ".3f"),
                 _fmt(_ratio(m.steady_s, _steady(sync.get(name.removesuffix(PREPARED)))), ".3f", "x"),
                 _fmt(m.steady_total_s), _worst_memory(m.first_calls())] for name, m in stalls.items()]
        widths = [max(len(str(c)) for c in column) for column in zip(heads, *rows)]
        print(f"\n{title}: {state.title}, {state.nbytes / GIB:.2f} GiB; {layout.describe()}")
        for row in [heads] + rows:
            print("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        sys.stdout.flush()
        self._keep(title, "async_save", state, layout, stalls, {name: (None, None) for name in stalls})

    def write_json(self, path: str | None) -> None:
        if path:
            with open(path, "w") as f:
                json.dump(self.payload, f, indent=1)
            print(f"\nall numbers written to {path}")


METHOD = (
    "method: every first call runs in freshly spawned ranks (median over --fresh starts; a call's time is its "
    "slowest rank's, between barriers); steady = median of the calls after the first in one set of processes "
    "(--repeat). Loads are cold: rank 0 fsyncs every checkpoint file and evicts it from the page cache "
    "(posix_fadvise DONTNEED) before each. Each save writes to a destination cleared before its ranks "
    "started, never between calls; as root, the page cache is dropped 3 s before each start. Saves count "
    "until durable (shardstore and DCP fsync; torch.save and safetensors are followed by an fsync of the "
    "file and its directory). Load targets are allocated and zeroed before the timer; torch.load/"
    "safetensors loads include copying into them. "
    "RSS: the worst rank's bytes held, RSS before the call and peak RSS during it (VmHWM, reset before the "
    "call; ru_maxrss, which a spawned process inherits from its parent, is in the JSON). read/needed: "
    "the worst rank's /proc/self/io rchar and read_bytes (disk) deltas, and what the system reports "
    "(shardstore: LoadResult.bytes_fetched), against the bytes its targets hold."
)
