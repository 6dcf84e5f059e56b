"""What the checkpoint benchmarks share: the systems compared and the fresh-process runs that time them.

Users meet a checkpoint in fresh processes: a job resuming after a crash starts new ranks and loads
once; a save runs in a process that has long since touched other memory. So every measured operation
runs in newly spawned ranks (multiprocessing spawn, gloo over loopback, as ``tools/launch.py`` does),
which build their state untimed, then do the operation between two barriers. ``measure`` repeats that
over ``fresh`` starts (the first call of each is a "first" measurement); the last start goes on to
repeat the operation ``repeat`` times in the same processes (the steady state: the repeats after the
first). Each save goes to a destination cleared before the ranks started (``call_path`` says why),
and where allowed the page cache is dropped before each start (``settle_memory``).
Before every load, rank 0 fsyncs each file of the checkpoint and evicts it from the page cache
(``POSIX_FADV_DONTNEED``), so every load is cold. Saves count until durable for every system:
shardstore and torch DCP's ``FileSystemWriter`` fsync by default; torch.save and safetensors are
followed by an fsync of the file and its directory.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import shardstore
from tools.bench_state import Layout, State, build_state
from tools.launch import free_port, rank_env, wait_all


# --- files ------------------------------------------------------------------------------------------

def _files(path: str) -> Iterator[str]:
    if os.path.isfile(path):
        yield path
        return
    for parent, _, names in os.walk(path):
        yield from (os.path.join(parent, n) for n in names)


def evict(path: str) -> None:
    """Sync every file under ``path`` and drop it from the page cache, so the next read is cold."""
    for name in _files(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    """Delete a checkpoint (a file or a directory tree) if it exists."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


SETTLE_SECONDS = 3.0


def settle_memory() -> None:
    """Put every start in the same memory state: where allowed (root), sync, drop the page cache and
    wait ``SETTLE_SECONDS``, so no system's first call finds memory that a deletion or the previous
    system's buffered writes freed a moment before (``call_path`` says what that was worth). Elsewhere
    a no-op: the first calls then depend on what ran before them."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        return
    time.sleep(SETTLE_SECONDS)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable(path: str) -> None:
    """Make a newly written single-file checkpoint durable: the file, then its directory entry."""
    _fsync(path)
    _fsync(os.path.dirname(os.path.abspath(path)))


# --- the systems ------------------------------------------------------------------------------------

def _copy_into(targets: dict, loaded: dict) -> None:
    """What ``model.load_state_dict(torch.load(...))`` does after reading: copy into the live tensors."""
    for name, tensor in targets.items():
        tensor.copy_(loaded[name])


def _torch_save(sd: dict, path: str) -> None:
    torch.save(sd, path)
    _durable(path)


def _torch_load(sd: dict, path: str) -> None:
    _copy_into(sd, torch.load(path, weights_only=True))


def _safetensors_save(sd: dict, path: str) -> None:
    save_file(sd, path)
    _durable(path)


def _safetensors_load(sd: dict, path: str) -> None:
    _copy_into(sd, load_file(path))


@dataclass(frozen=True)
class System:
    """How one system saves a state dict to ``path`` and loads it back in place. ``load`` returns the
    bytes the system itself reports having read, or None; ``distributed``: it runs on many ranks.
    ``async_save(sd, path, max_staging_bytes)`` starts a save and returns something whose ``result()``
    waits for it (None: the system has none); ``prepare_async(sd, max_staging_bytes)`` readies the
    memory of a first async save ahead of it (None: the system cannot)."""

    save: Callable[[dict, str], object]
    load: Callable[[dict, str], int | None]
    distributed: bool
    async_save: Callable[[dict, str, int | None], Any] | None = None
    prepare_async: Callable[[dict, int | None], None] | None = None


PREPARED = ", prepared"  # the name of a system's async case when its ranks prepare before the first call


SYSTEMS = {
    "shardstore": System(
        lambda sd, path: shardstore.save(sd, path), lambda sd, path: shardstore.load(sd, path).bytes_fetched, True,
        lambda sd, path, budget: shardstore.async_save(sd, path, max_staging_bytes=budget),
        lambda sd, budget: shardstore.prepare_async_save(sd, max_staging_bytes=budget).result(),
    ),
    "torch DCP": System(
        lambda sd, path: dcp.save(sd, checkpoint_id=path), lambda sd, path: dcp.load(sd, checkpoint_id=path), True,
        lambda sd, path, budget: dcp.async_save(sd, checkpoint_id=path),  # its default stager: no bound
    ),
    "torch.save": System(_torch_save, _torch_load, False),
    "safetensors": System(_safetensors_save, _safetensors_load, False),
}


def checkpoint_path(directory: str, system: str) -> str:
    """Where ``system``'s checkpoint goes in a benchmark directory."""
    return os.path.join(directory, system.replace(" ", "-").replace(".", "-"))


def systems_for(layout: Layout) -> list[str]:
    """Every system for one process without a process group, the distributed ones otherwise."""
    return [name for name, system in SYSTEMS.items() if layout.shard_dim is None or system.distributed]


# --- one measured operation in spawned ranks --------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One set of fresh ranks doing ``op`` ("save", "load" or "async_save") with ``system`` ``repeats``
    times. An async save's time is the caller's stall; it then mutates the state (as the next optimizer
    step would) and waits for the commit."""

    system: str
    op: str
    state: State
    layout: Layout
    path: str
    repeats: int
    out: str = ""  # results file prefix, one file per rank
    max_staging_bytes: int | None = None  # shardstore's async_save bound
    prepared: bool = False  # an async save's ranks prepare its memory (untimed) before the first call


@dataclass(frozen=True)
class Record:
    """One rank's numbers for one call. Memory in bytes: ``peak`` is VmHWM reset to the RSS just before
    the call (``ru_maxrss`` alone cannot show a call's peak: a spawned process inherits its parent's at
    exec, and it never goes down). ``rchar`` is the /proc/self/io delta of bytes passed through read
    calls, ``disk_read`` its ``read_bytes`` (fetched from storage, mmap page-ins included)."""

    rank: int
    call: int
    seconds: float
    held: int
    rss_before: int
    peak: int
    ru_maxrss: int
    rchar: int
    disk_read: int
    reported_read: int | None
    total: float = 0.0  # seconds until the operation ended on every rank (an async save's commit included)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _barrier(layout: Layout) -> None:
    if layout.shard_dim is not None:
        dist.barrier()


def call_path(job: Job, call: int) -> str:
    """Where call ``call`` of a job saves (or loads): the first call of each start at ``job.path`` (where
    the loads find it), each later save at a path of its own, as a training job saves each step anew.

    Why not clear one destination before each call: deleting a checkpoint written through the page
    cache frees its pages, and a call made right after gets that memory already backed by the
    hypervisor, while memory the guest has held free for a few seconds is handed back and is slow to
    touch again (on the 2-core virtual machine these numbers come from). Cleared in the call's shadow,
    torch DCP's first async save copied into its own just-freed page cache (0.67-1.04 s for 2 GiB
    against shardstore's 1.9-2.9 s); with the page cache dropped before each start instead, 2.9-3.8 s
    against 1.1-3.3 s. So ``spawn`` clears the destinations before the ranks start (then
    ``settle_memory``) and after they end, never between calls."""
    return job.path if call == 0 or job.op == "load" else f"{job.path}.{call}"


def _timed_call(job: Job, rank: int, call: int, sd: dict, held: int) -> Record:
    if rank == 0 and job.op == "load":
        evict(job.path)
    _barrier(job.layout)
    _reset_peak()
    io, rss = _io(), _status("VmRSS")
    start = time.perf_counter()
    reported, stall = _operate(job, sd, call_path(job, call))
    _barrier(job.layout)
    seconds = time.perf_counter() - start
    after = _io()
    reported = reported if isinstance(reported, int) else None
    return Record(rank, call, seconds if stall is None else stall, held, rss, _status("VmHWM"), _ru_maxrss(),
                  after["rchar"] - io["rchar"], after["read_bytes"] - io["read_bytes"], reported, seconds)


def _operate(job: Job, sd: dict, path: str) -> tuple[object, float | None]:
    """Run the operation; for an async save also return the caller's stall, then mutate every tensor
    (the saved values must be those of the call) and wait for the commit."""
    system = SYSTEMS[job.system]
    if job.op != "async_save":
        return getattr(system, job.op)(sd, path), None
    start = time.perf_counter()
    pending = system.async_save(sd, path, job.max_staging_bytes)
    stall = time.perf_counter() - start
    with torch.no_grad():
        for tensor in sd.values():
            (tensor.to_local() if hasattr(tensor, "to_local") else tensor).add_(1)
    pending.result()
    return None, stall


def _run_job(rank: int, job: Job) -> None:
    warnings.filterwarnings("ignore")
    sd, held = build_state(job.state, job.layout, fill=job.op == "save")
    if job.prepared:
        SYSTEMS[job.system].prepare_async(sd, job.max_staging_bytes)
    records = [_timed_call(job, rank, call, sd, held) for call in range(job.repeats)]
    with open(f"{job.out}.rank{rank}.json", "w") as f:
        json.dump([asdict(r) for r in records], f)


def _rank_entry(rank: int, port: int, job: Job) -> None:
    os.environ.update(rank_env(rank, job.layout.world, port))
    if job.layout.shard_dim is None:
        _run_job(rank, job)
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    try:
        _run_job(rank, job)
    finally:
        dist.destroy_process_group()


def spawn(job: Job) -> list[list[Record]]:
    """Run ``job`` on freshly spawned ranks; their records, rank by rank. A failed rank stops them all."""
    ctx = mp.get_context("spawn")
    port = free_port()
    saves = range(job.repeats) if job.op != "load" else range(0)
    for call in saves:
        remove(call_path(job, call))
    settle_memory()
    with tempfile.TemporaryDirectory() as tmp:
        job = replace(job, out=os.path.join(tmp, "records"))
        procs = [ctx.Process(target=_rank_entry, args=(r, port, job)) for r in range(job.layout.world)]
        for p in procs:
            p.start()
        failed = wait_all(procs)
        for call in saves[1:]:
            remove(call_path(job, call))
        if failed:
            raise SystemExit(f"{job.system} {job.op} ({job.layout.describe()}): ranks {failed} failed")
        return [_read_records(f"{job.out}.rank{r}.json") for r in range(job.layout.world)]


def _read_records(path: str) -> list[Record]:
    with open(path) as f:
        return [Record(**r) for r in json.load(f)]


@dataclass(frozen=True)
class Measurement:
    """Every call of one system's operation: ``starts[k][rank][call]``. A call's time is its slowest
    rank's (the ranks time between the same barriers)."""

    system: str
    starts: tuple[tuple[tuple[Record, ...], ...], ...]

    def call_seconds(self, start: int, call: int) -> float:
        return max(ranks[call].seconds for ranks in self.starts[start])

    @property
    def steady_total_s(self) -> float | None:
        """Median until every rank ended (an async save's commit), over the calls after the first."""
        calls = len(self.starts[-1][0])
        totals = [max(ranks[c].total for ranks in self.starts[-1]) for c in range(1, calls)]
        return statistics.median(totals) if totals else None

    @property
    def first_s(self) -> float:
        """Median over the fresh starts of the first call's time."""
        return statistics.median(self.call_seconds(k, 0) for k in range(len(self.starts)))

    @property
    def steady_s(self) -> float | None:
        """Median of the calls after the first in the last start (None without repeats)."""
        calls = len(self.starts[-1][0])
        return statistics.median(self.call_seconds(-1, c) for c in range(1, calls)) if calls > 1 else None

    def first_calls(self) -> list[Record]:
        """Every rank's record of the first call of every fresh start."""
        return [ranks[0] for start in self.starts for ranks in start]


def measure(job: Job, fresh: int, repeat: int) -> Measurement:
    """``fresh`` starts of new ranks, each making one call, the last making ``repeat`` calls."""
    starts = []
    for k in range(fresh):
        calls = max(1, repeat) if k == fresh - 1 else 1
        starts.append(tuple(tuple(ranks) for ranks in spawn(replace(job, repeats=calls))))
    return Measurement(job.system, tuple(starts))
