"""Training demo: exact resume after a crash, on half the ranks.

A small transformer trains over a (data parallel 2, tensor parallel n/2) mesh — (2, 2) on 4 ranks — with
our DTensor (Megatron-style tensor parallel inside each data-parallel replica, gradients all-reduced
across replicas), AdamW and gradient clipping. Its app state (model, optimizer, step, the RNG state that
draws the data, the data loader's position) is saved every ``--save-every`` steps through a
``shardstore.CheckpointManager`` (asynchronously: each save returns once the state is staged).

1. train (n ranks, one job): the run trains ``--steps`` steps uninterrupted — its losses are the
   yardstick — then trains again from scratch, saving; every rank SIGKILLs itself in the middle of
   writing the checkpoint of step ``--crash-at`` (after its first chunk object), as a power cut or an
   OOM killer would.
2. resume: n/2 ranks (one data-parallel replica, the same tensor-parallel degree) restore the latest
   complete step — the manager ignores the killed one — and train on, each step accumulating the
   gradients of both replicas' micro-batches in the order the all-reduce would add them. Its losses must
   equal the reference's exactly (bit for bit), step for step.

Run: ``python tools/train_demo.py --nproc 4`` (or ``--steps 12 --save-every 3 --crash-at 9 --dir out/x``)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import dtensor  # noqa: E402
import shardstore  # noqa: E402
from dtensor import Replicate, parallel  # noqa: E402
from tools.launch import add_launch_args, launch  # noqa: E402
from tools.tiny_transformer import TinyTransformer, loss_fn, tensor_parallel_plan  # noqa: E402

VOCAB, SEQ, MICRO_BATCH, REPLICAS = 64, 16, 4, 2  # REPLICAS: data-parallel replicas of the full run


def say(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


class DataLoader:
    """Global batches drawn from torch's global RNG (seeded alike on every rank); ``position`` counts the
    batches handed out. Both are part of the app state, so a resumed run draws the same next batch."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, VOCAB, (REPLICAS * MICRO_BATCH, SEQ + 1))
        self.position += 1
        return tokens[:, :-1], tokens[:, 1:]


def build(tp: int, device: str):
    """The model, tensor parallel over ``tp`` ranks of its replica, every parameter a DTensor; AdamW."""
    dp = dist.get_world_size() // tp
    mesh = dtensor.init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = TinyTransformer(vocab=VOCAB)
    parallel.parallelize_module(model, mesh["tp"], tensor_parallel_plan(parallel.ColwiseParallel, parallel.RowwiseParallel, Replicate(), 2))
    for module in model.modules():  # layer norms: replicate, so the optimizer sees DTensors only
        for name, p in list(module.named_parameters(recurse=False)):
            if not isinstance(p, dtensor.DTensor):
                setattr(module, name, nn.Parameter(dtensor.distribute_tensor(p.data, mesh["tp"], [Replicate()])))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, mesh


def app_state(model, opt, loader: DataLoader, step: int) -> dict:
    """Everything the next step depends on; optimizer state keyed by parameter name (created empty first
    so a restore can fill it in place)."""
    names = {p: n for n, p in model.named_parameters()}
    for p in names:
        if p not in opt.state:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return {"model": model.state_dict(), "optim": {names[p]: s for p, s in opt.state.items()},
            "data": {"position": loader.position}, "rng": torch.get_rng_state(), "step": step}


def train_step(model, opt, loader: DataLoader, mesh) -> float:
    """One optimizer step over the global batch; the mean of the replicas' micro-batch losses.

    With two replicas each computes its micro-batch's gradient and the all-reduce adds the two; with one,
    it back-propagates both micro-batches, which adds their gradients the same way (a + b == b + a), so
    both runs take bit-identical steps."""
    tokens, targets = (t.to(mesh.device_type) for t in loader.next_batch())
    dp, me = mesh["dp"].size(), mesh["dp"].get_local_rank()
    total = None
    for i in range(me * REPLICAS // dp, (me + 1) * REPLICAS // dp):
        rows = slice(i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
        loss = loss_fn(model(tokens[rows]), targets[rows])
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    with torch.no_grad():  # to_local() is then the gradient's own local tensor
        for p in model.parameters():
            if dp > 1:
                dist.all_reduce(p.grad.to_local(), group=mesh.get_group("dp"))
            p.grad.div_(REPLICAS)
    if dp > 1:
        dist.all_reduce(total, group=mesh.get_group("dp"))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return (total / REPLICAS).item()


def kill_mid_save(step: int) -> None:
    """SIGKILL this process right after it wrote its first chunk object of step ``step``'s checkpoint."""
    from shardstore.format import is_object_key
    from shardstore.storage.local import LocalStorage

    write = LocalStorage.write

    def write_then_die(self, key, data):
        write(self, key, data)
        if f"/step-{step}." in self.url and is_object_key(key):
            os.kill(os.getpid(), signal.SIGKILL)

    LocalStorage.write = write_then_die


def run(args) -> None:
    """One rank: the reference run then the run that crashes (one job: processes start once), or the
    resumed run."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.phase == "resume":
        train(args, "resume", shardstore.CheckpointManager(str(Path(args.dir) / "run"), save_interval_steps=args.save_every))
        return
    train(args, "reference", None)
    kill_mid_save(args.crash_at)
    train(args, "crash", shardstore.CheckpointManager(str(Path(args.dir) / "run"), max_to_keep=2,
                                                      save_interval_steps=args.save_every))


def train(args, name: str, manager) -> None:
    """Train from scratch (or, resuming, from the manager's latest step) up to ``args.steps``, saving
    through ``manager`` if given; rank 0 writes the losses to ``<dir>/<name>.json``."""
    model, opt, mesh = build(args.tp, args.device)
    torch.manual_seed(1234)  # the data stream
    loader, start, losses = DataLoader(), 0, {}
    if name == "resume":
        state = app_state(model, opt, loader, 0)
        start = manager.restore(state)
        torch.set_rng_state(state["rng"])
        loader.position = state["data"]["position"]
        say(f"[resume] {dist.get_world_size()} ranks, mesh {tuple(mesh.shape)}: restored step {start} "
            f"(complete steps {manager.all_steps()}), data position {loader.position}")
    for step in range(start + 1, args.steps + 1):
        losses[step] = train_step(model, opt, loader, mesh)
        if manager is not None:
            manager.save(step, app_state(model, opt, loader, step))
    if manager is not None:
        manager.close()
    if dist.get_rank() == 0:
        (Path(args.dir) / f"{name}.json").write_text(json.dumps(losses))


def phase(args, name: str, nproc: int, outputs: tuple[str, ...]) -> list[dict[int, float]]:
    """Launch ``run`` on ``nproc`` ranks; the losses of each run named in ``outputs``."""
    launch_args = argparse.Namespace(**{**vars(args), "nproc": nproc, "phase": name})
    start = time.perf_counter()
    try:
        launch(run, launch_args)
    except SystemExit:
        if name != "train":
            raise  # the training job is meant to die (SIGKILL mid-save)
    print(f"[{name}] {nproc} ranks, {time.perf_counter() - start:.1f} s", flush=True)
    return [{int(k): v for k, v in json.loads((Path(args.dir) / f"{out}.json").read_text()).items()} for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_launch_args(parser)
    parser.add_argument("--dir", default=str(Path("out") / "train_demo"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--crash-at", type=int, default=9)
    args = parser.parse_args()
    args.nproc = args.nproc or 4
    args.tp = args.nproc // REPLICAS  # the same tensor-parallel degree in every phase
    if args.nproc % REPLICAS or args.crash_at % args.save_every or not args.save_every < args.crash_at <= args.steps:
        parser.error("--nproc must be even, and --crash-at a multiple of --save-every after the first save")
    shutil.rmtree(args.dir, ignore_errors=True)
    Path(args.dir).mkdir(parents=True)
    (reference,) = phase(args, "train", args.nproc, ("reference",))
    (resumed,) = phase(args, "resume", args.nproc // REPLICAS, ("resume",))
    print("step  reference  resumed")
    for step, loss in sorted(resumed.items()):
        print(f"{step:4d}  {reference[step]:.7f}  {loss:.7f}")
    if not resumed or any(reference[s] != loss for s, loss in resumed.items()):
        raise SystemExit("the resumed run does not reproduce the uninterrupted one exactly")
    print(f"train demo ok: resumed on {args.nproc // REPLICAS} ranks, {len(resumed)} steps bit-identical to the uninterrupted run")


if __name__ == "__main__":
    main()
