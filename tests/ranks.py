"""Run a test body on N ranks with real process groups, reusing the worker processes across tests.

``run_ranks(world_size, fn, *args)`` sends ``fn`` (a module-level function, pickled by name) to every rank
of a pool of spawned workers, each already inside ``init_process_group`` (gloo on CPU; with
``SHARDSTORE_TEST_DEVICE=cuda``, NCCL at world size 1 and gloo with CUDA tensors above). It returns the
per-rank results, or raises one error holding every failing rank's traceback. A rank that fails or hangs
does not hang the suite: once one rank fails the others get a short grace period, a body that runs past
its timeout is killed, and the pool is replaced for the next test.

Inside a body, ``mesh(shape)`` returns a cached ``DeviceMesh`` over the first prod(shape) ranks and
``device()`` the device tensors should live on.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any, Callable

COLLECTIVE_TIMEOUT_S = float(os.environ.get("SHARDSTORE_COLLECTIVE_TIMEOUT", "30"))
FAILURE_GRACE_S = 5.0

_pools: dict[tuple[int, str], "RankPool"] = {}
_meshes: dict[tuple, Any] = {}


class RankFailure(AssertionError):
    """One or more ranks raised or hung; the message holds every rank's story."""


def device() -> str:
    """The device type tensors of a test body live on: 'cpu', or 'cuda' on a GPU check run."""
    return os.environ.get("SHARDSTORE_TEST_DEVICE", "cpu")


def mesh(shape: tuple[int, ...]):
    """A DeviceMesh of ``shape`` over ranks 0..prod(shape)-1, built once per worker and reused.

    Every rank of the world must call it (building sub-groups is collective); ranks outside a sub-mesh
    get a mesh they are not part of.
    """
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    key = tuple(shape)
    if key not in _meshes:
        ranks = torch.arange(math.prod(shape), device="cpu").reshape(shape)
        _meshes[key] = DeviceMesh(device(), ranks)
    return _meshes[key]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, conn) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    )
    import faulthandler
    import logging

    import torch
    import torch.distributed as dist

    faulthandler.enable()  # a rank that crashes in native code (SIGSEGV, SIGABRT) prints where it was
    torch.set_num_threads(1)
    logging.getLogger("torch.distributed.tensor").setLevel(logging.ERROR)  # the oracle's advice is noise here
    backend = "gloo"
    if device() == "cuda":
        torch.cuda.set_device(0)
        torch.set_default_device("cuda")  # test bodies then build their tensors on the GPU unchanged
        backend = "nccl" if world_size == 1 else "gloo"
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            os._exit(0)  # no destroy_process_group: it waits on peers, and exit frees everything
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - the test process shows it
            conn.send(("error", traceback.format_exc()))


class RankPool:
    """``world_size`` spawned worker processes in one process group, fed test bodies over pipes."""

    def __init__(self, world_size: int, start_timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world_size = world_size
        self.conns = []
        self.procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, port, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        results = self._collect(start_timeout, "starting the process group")
        if any(kind != "ready" for kind, _ in results):
            self.close()
            raise RankFailure(self._report(results, "starting the process group"))

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list:
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        results = self._collect(timeout, fn.__qualname__)
        if any(kind != "ok" for kind, _ in results):
            raise RankFailure(self._report(results, fn.__qualname__))
        return [value for _, value in results]

    def _collect(self, timeout: float, what: str) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * self.world_size
        deadline = time.monotonic() + timeout
        while any(r is None for r in results):
            now = time.monotonic()
            if now > deadline:
                break
            for rank, conn in enumerate(self.conns):
                if results[rank] is None and conn.poll(0.01):
                    try:
                        results[rank] = conn.recv()
                    except EOFError:
                        results[rank] = ("error", f"rank {rank} died (exit code {self.procs[rank].exitcode})")
                    if results[rank][0] == "error":
                        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                elif results[rank] is None and not self.procs[rank].is_alive():
                    results[rank] = ("error", f"rank {rank} died (exit code {self.procs[rank].exitcode})")
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        return [r if r is not None else ("hung", f"no answer after the time limit while {what}") for r in results]

    @staticmethod
    def _report(results: list[tuple[str, Any]], what: str) -> str:
        lines = [f"{what} failed on {sum(k != 'ok' for k, _ in results)} of {len(results)} ranks"]
        for rank, (kind, value) in enumerate(results):
            if kind != "ok":
                lines.append(f"--- rank {rank}: {kind}\n{value}")
        return "\n".join(lines)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()


def run_ranks(world_size: int, fn: Callable, *args, timeout: float = 120.0, pool: str = "shared", **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on every rank of a ``world_size`` process group; per-rank results.

    Bodies run in the workers of the pool named ``pool`` (one per name and world size). A test module
    that runs arbitrary native kernels (torch's whole op database) takes a pool of its own and closes it
    with ``close_pool``, so neither its heap nor its state is shared with the checkpoint tests."""
    key = (world_size, pool)
    workers = _pools.get(key)
    if workers is None:
        workers = _pools[key] = RankPool(world_size)
    try:
        return workers.run(fn, args, kwargs, timeout)
    except RankFailure:
        del _pools[key]
        workers.close()
        raise


def close_pool(world_size: int, pool: str) -> None:
    """Stop the workers of one named pool (if running)."""
    workers = _pools.pop((world_size, pool), None)
    if workers is not None:
        workers.close()


def close_pools() -> None:
    """Stop every worker; called once at the end of the test session."""
    while _pools:
        _pools.popitem()[1].close()
