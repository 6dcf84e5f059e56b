"""Start a multi-rank program the way users start training: under ``torchrun`` (env:// rendezvous), or
as ``python tools/x.py --nproc 4``, which spawns the ranks itself with the same environment variables.

A rank that fails makes the whole launch fail (the others are stopped), so nothing hangs silently.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import socket
import sys
from typing import Callable


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None, help="spawn this many ranks (without torchrun)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device the tensors live on")


def _init(device: str) -> None:
    import torch
    import torch.distributed as dist

    world_size = int(os.environ["WORLD_SIZE"])
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        backend = "nccl" if world_size <= torch.cuda.device_count() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives a rank on one machine (env:// rendezvous on loopback ``port``)."""
    return dict(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )


def _rank_main(rank: int, world_size: int, port: int, main: Callable, args) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    _run(main, args)


def _run(main: Callable, args) -> None:
    import torch.distributed as dist

    _init(args.device)
    try:
        main(args)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A loopback TCP port free right now, for the rendezvous of ranks spawned here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(main: Callable, args) -> None:
    """Run ``main(args)`` on every rank: this process under torchrun, else ``args.nproc`` spawned ones."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _run(main, args)
        return
    nproc = args.nproc or 1
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, port, main, args)) for r in range(nproc)]
    for p in procs:
        p.start()
    failed = wait_all(procs)
    if failed:
        sys.exit(f"ranks {failed} failed")


def wait_all(procs) -> list[int]:
    """Wait for every process; once one fails, kill the rest (nobody hangs) and return the failed ranks."""
    from multiprocessing.connection import wait

    pending = {p.sentinel: (rank, p) for rank, p in enumerate(procs)}
    failed: list[int] = []
    while pending:
        for sentinel in wait(list(pending)):
            rank, p = pending.pop(sentinel)
            p.join()
            if p.exitcode != 0:
                failed.append(rank)
        if failed:
            for _, p in pending.values():
                p.kill()
            break
    return failed
