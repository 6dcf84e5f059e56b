"""Training demo: a small transformer trained with tensor parallelism over our DTensor, checkpointed
with shardstore, and resumed on a different number of ranks.

1. 4 ranks: Megatron-style tensor parallel (dtensor.parallel), AdamW + gradient clipping, 20 steps;
   save model and optimizer state (every rank writes its own shards).
2. 2 ranks: a fresh model with other weights, parallelized over 2 ranks, loads the checkpoint
   (resharding 4 -> 2 column/row shards) and reproduces the trained model's loss.

Run: ``python tools/train_demo.py --nproc 4``
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import dtensor  # noqa: E402
import shardstore  # noqa: E402
from dtensor import Replicate, parallel  # noqa: E402
from dtensor.dispatch import fallback_ops  # noqa: E402
from tools.launch import add_launch_args, launch  # noqa: E402
from tools.tiny_transformer import TinyTransformer, batches, loss_fn, tensor_parallel_plan  # noqa: E402


def say(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def parallel_model(seed: int, device: str) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyTransformer()
    mesh = dtensor.init_device_mesh(device, (dist.get_world_size(),))
    parallel.parallelize_module(model, mesh, tensor_parallel_plan(parallel.ColwiseParallel, parallel.RowwiseParallel, Replicate(), 2))
    for module in model.modules():  # layer norms: replicate, so the optimizer sees DTensors only
        for name, p in list(module.named_parameters(recurse=False)):
            if not isinstance(p, dtensor.DTensor):
                setattr(module, name, nn.Parameter(dtensor.distribute_tensor(p.data, mesh, [Replicate()])))
    return model


def train(args) -> None:
    warnings.filterwarnings("ignore")
    model = parallel_model(0, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens, targets = next(batches(1, batch=8, seq=16, vocab=64))
    say(f"[train] {dist.get_world_size()} ranks, tensor parallel; e.g. blocks.0.q.weight is "
        f"{list(model.blocks[0].q.weight.placements)}, local {tuple(model.blocks[0].q.weight.to_local().shape)}")
    for step in range(20):
        loss = loss_fn(model(tokens), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 5 == 0 or step == 19:
            say(f"  step {step:2d} loss {loss.item():.4f}")
    final = loss_fn(model(tokens), targets).item()
    names = {p: n for n, p in model.named_parameters()}
    state = {"model": model.state_dict(), "optim": {names[p]: s for p, s in opt.state.items()}, "step": 20}
    result = shardstore.save(state, args.url, overwrite=True, user_metadata={"loss": final})
    say(f"[save] model + AdamW state: rank 0 wrote {result.bytes_written / 2**10:.0f} KiB in {result.chunks_written} "
        f"chunks; ops that fell back to replicate: {sorted(fallback_ops) or 'none'}")


def resume(args) -> None:
    warnings.filterwarnings("ignore")
    model = parallel_model(1, args.device)  # other weights until the load
    tokens, targets = next(batches(1, batch=8, seq=16, vocab=64))
    before = loss_fn(model(tokens), targets).item()
    state = {"model": model.state_dict(), "step": 0}
    shardstore.load(state, args.url, strict=False)
    after = loss_fn(model(tokens), targets).item()
    saved = shardstore.open(args.url).user_metadata["loss"]
    say(f"[resume] {dist.get_world_size()} ranks: loss {before:.4f} before loading, {after:.4f} after "
        f"(trained model: {saved:.4f}); step {state['step']}")
    if abs(after - saved) > 1e-4:
        raise SystemExit("the resumed model does not reproduce the trained one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_launch_args(parser)
    parser.add_argument("--url", default=str(Path("out") / "train_checkpoint"))
    args = parser.parse_args()
    args.nproc = args.nproc or 4
    launch(train, args)
    args.nproc = max(1, args.nproc // 2)
    launch(resume, args)
    print("train demo ok")


if __name__ == "__main__":
    main()
