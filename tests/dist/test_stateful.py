"""Stateful values (torch DCP's protocol) and the state dicts of torch's ``get_state_dict`` family.

The app-state pattern of torch's DCP tutorial and torchtitan: a wrapper whose ``state_dict`` is
``get_state_dict(model, optimizer)`` and whose ``load_state_dict`` is ``set_state_dict``, the data
loader and the LR scheduler, each a top-level Stateful value, saved on 4 ranks (tensor parallel) and
loaded on 2 resumes exactly: every restored value equals the saved one bit for bit, and training goes on
with the losses of the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import dtensor
import shardstore
from tests.ranks import mesh, run_ranks

SAVED_AT = 3  # training steps before the save
AFTER = 2  # steps after it, in the uninterrupted run and after the resume


class AppState(Stateful):
    """Model and optimizer, as torch's DCP tutorial wraps them."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state_dict: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])


class Loader(Stateful):
    """A data loader whose batches depend only on its position."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.position)
        self.position += 1
        return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict) -> None:
        self.position = state_dict["position"]


def _job(world: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    parallelize_module(model, mesh((world,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return {"app": AppState(model, optimizer), "loader": Loader(), "scheduler": scheduler}


def _train(job: dict, steps: int) -> list[float]:
    model, optimizer = job["app"].model, job["app"].optimizer
    losses = []
    for _ in range(steps):
        x, y = job["loader"].next_batch()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        job["scheduler"].step()
        losses.append(loss.item())
    return losses


def _snapshot(job: dict) -> dict:
    """Every value a resume must restore, as full plain tensors and numbers."""
    model, optim = get_state_dict(job["app"].model, job["app"].optimizer)
    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    tensors = {f"model.{k}": full(v) for k, v in model.items()}
    tensors |= {f"optim.{k}.{n}": full(v) for k, state in optim["state"].items() for n, v in state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
    return {"tensors": tensors, "groups": groups, "position": job["loader"].position,
            "scheduler": job["scheduler"].state_dict()}


def _save_then_train(url: str) -> tuple[dict, list[float]]:
    job = _job(dist.get_world_size(), seed=0)
    _train(job, SAVED_AT)
    saved = _snapshot(job)
    handle = shardstore.async_save(job, url)
    losses = _train(job, AFTER)  # mutates everything while the save is in flight
    handle.result(timeout=60)
    return saved, losses


def _resume_then_train(url: str) -> tuple[dict, list[float]]:
    job = _job(dist.get_world_size(), seed=1)  # other weights, a fresh optimizer and scheduler
    _train(job, 1)  # so that the optimizer has state and the positions differ
    shardstore.load(job, url)
    return _snapshot(job), _train(job, AFTER)


def test_stateful_app_state_saved_on_4_ranks_resumes_exactly_on_2(tmp_path: Path):
    url = str(tmp_path / "ckpt")
    saved, losses = run_ranks(4, _save_then_train, url, timeout=600)[0]
    restored, resumed = run_ranks(2, _resume_then_train, url, timeout=600)[0]
    assert restored["tensors"].keys() == saved["tensors"].keys() and len(saved["tensors"]) == 16
    for key, value in saved["tensors"].items():
        assert torch.equal(restored["tensors"][key], value), key
    assert restored["groups"] == saved["groups"] and restored["groups"][0]["lr"] == 0.005
    assert restored["position"] == saved["position"] == SAVED_AT
    assert restored["scheduler"] == saved["scheduler"] and saved["scheduler"]["last_epoch"] == SAVED_AT
    assert resumed == pytest.approx(losses, rel=1e-6)  # 2 vs 4 partial sums: rounding differs only


def _model(kind: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A plain model (every rank holds all of it), or one whose parameters are our DTensors."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 8)
    if kind == "ours":
        def shard(name, module, m):
            for n, p in list(module.named_parameters(recurse=False)):
                module.register_parameter(n, torch.nn.Parameter(dtensor.distribute_tensor(p.data, m, [dtensor.Shard(0)])))

        dtensor.distribute_module(model, mesh((dist.get_world_size(),)), shard)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01 * (seed + 1))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _round_trip_through_get_state_dict(url: str, kind: str) -> bool:
    model, optimizer = _model(kind, seed=0)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    shardstore.async_save({"model": model_sd, "optim": optim_sd}, url).result(timeout=60)
    other, other_optimizer = _model(kind, seed=1)
    model_sd, optim_sd = get_state_dict(other, other_optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    shardstore.load(target, url)
    set_state_dict(other, other_optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    same = [torch.equal(_local(a), _local(b)) for a, b in zip(model.parameters(), other.parameters())]
    return all(same) and other_optimizer.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("kind", ["plain", "ours"])
def test_get_state_dict_of_a_plain_model_or_our_dtensors_saves_and_set_state_dict_applies_it(tmp_path: Path, kind):
    assert run_ranks(2, _round_trip_through_get_state_dict, str(tmp_path / "ckpt"), kind) == [True, True]
