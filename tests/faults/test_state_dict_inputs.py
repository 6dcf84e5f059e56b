"""Hostile state dicts: whatever a state dict holds, save and load do the right thing or refuse it, naming
the key, before any byte is written (save) or any tensor changes (load, in both modes), on every rank.

Multi-rank bodies put the odd entry on the last rank only: one bad rank must fail the step everywhere.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import dtensor
import shardstore
from shardstore.errors import CorruptCheckpointError, PartialLoadError, UnsupportedInputError
from shardstore.flatten import MAX_NAME_BYTES, keypath_from_node, node_path
from tests.ranks import mesh, run_ranks

STREAMED = 64  # staging_bytes small enough that every load streams batch by batch

Pair = namedtuple("Pair", "tensor count")


def _rank() -> int:
    return torch.distributed.get_rank()


def _world() -> int:
    return torch.distributed.get_world_size()


def _t(i: float, n: int = 6) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 10 * i


def _describe(value):
    """Structure and values, with tensors as their values: what a load must give back."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.tolist())
    if isinstance(value, dict):
        return ("dict", {k: _describe(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_describe(v) for v in value])
    return (type(value).__name__, value)


def _tensor_ids(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [id(value)]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [i for child in children for i in _tensor_ids(child)]


def _files(root: str) -> dict[str, bytes]:
    return {os.path.join(d, f): Path(d, f).read_bytes() for d, _, fs in os.walk(root) for f in fs}


# -- structure ------------------------------------------------------------------------------------------

# name -> (saved, target to load into, strict, what the target must hold afterwards)
STRUCTURES = {
    "tuple_with_tensor": lambda: ({"pair": (_t(1), 7)}, {"pair": (_t(0), 0)}, True, {"pair": (_t(1), 7)}),
    "namedtuple": lambda: ({"nt": Pair(_t(1), 3)}, {"nt": Pair(_t(0), 0)}, True, {"nt": Pair(_t(1), 3)}),
    "nested": lambda: (
        {"l": [(_t(1), {"k": 5}, ((_t(2),), 4)), [], {}, None, ()], "s": 3},
        {"l": [(_t(0), {"k": 0}, ((_t(0),), 0)), [], {}, None, ()], "s": 0},
        True,
        {"l": [(_t(1), {"k": 5}, ((_t(2),), 4)), [], {}, None, ()], "s": 3},
    ),
    "empty_and_none": lambda: (
        {"a": {}, "b": [], "c": (), "d": None, "w": _t(1)},
        {"a": {}, "b": [], "c": (), "d": None, "w": _t(0)},
        True,
        {"a": {}, "b": [], "c": (), "d": None, "w": _t(1)},
    ),
    "saved_tensors_where_target_has_placeholders": lambda: (
        {"a": {"t": _t(1), "n": 1}, "b": [_t(2), 5], "c": (_t(3),), "d": (_t(4), 2), "w": _t(5)},
        {"a": None, "b": [None, 0], "c": {}, "d": [], "w": _t(0)},
        False,
        {"a": None, "b": [None, 5], "c": {}, "d": [], "w": _t(5)},
    ),
    "plain_saved_where_target_has_tensor": lambda: (
        {"w": 5, "v": _t(1), "m": {"x": 1}},
        {"w": _t(0), "v": _t(0), "m": {"x": _t(0)}},
        False,
        {"w": _t(0), "v": _t(1), "m": {"x": _t(0)}},
    ),
}


def _structure_body(url: str, case: str):
    saved, target, strict, _ = STRUCTURES[case]()
    shardstore.save(saved, url)
    ids = sorted(_tensor_ids(target))
    shardstore.load(target, url, strict=strict)
    return _describe(target), sorted(_tensor_ids(target)) == ids


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_load_restores_exactly_the_structure_it_was_given(tmp_path, case, world):
    expected = _describe(STRUCTURES[case]()[3])
    for described, same_tensors in run_ranks(world, _structure_body, str(tmp_path / "ck"), case):
        assert described == expected
        assert same_tensors  # the target's own tensors were filled, none swapped in or left out


# -- load targets -----------------------------------------------------------------------------------------

SAVED = {"a": _t(1, 8), "b": _t(1, 8), "c": _t(2, 8), "w": _t(3, 12).reshape(3, 4)}  # a == b (tied weights)


def _target(case: str) -> dict:
    """Zeros shaped like ``SAVED``, with an entry made odd as ``case`` says."""
    model = {k: torch.zeros_like(v) for k, v in SAVED.items()}
    if case == "parameter":
        model["w"] = torch.nn.Parameter(torch.zeros(3, 4))
    elif case == "inference":
        with torch.inference_mode():
            model["w"] = torch.zeros(3, 4)
    elif case == "transposed":
        model["w"] = torch.zeros(4, 3).t()
    elif case == "tied":
        model["b"] = model["a"]
    elif case == "tied_but_saved_different":
        model["c"] = model["a"]
    elif case == "expanded":
        model["w"] = torch.zeros(4).expand(3, 4)
    elif case == "meta":
        model["w"] = torch.empty(3, 4, device="meta")
    elif case == "overlapping":
        base = torch.zeros(12)
        model["a"], model["c"] = base[:8], base[4:]
    elif case == "sparse":
        model["w"] = torch.zeros(3, 4).to_sparse()
    return {"model": model, "step": -1}


LOADABLE = ("parameter", "inference", "transposed", "tied")
REFUSED = {"expanded": "model.w", "meta": "model.w", "overlapping": "model.a", "sparse": "model.w"}


def _snapshot(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd["model"].items() if v.device.type != "meta" and v.layout == torch.strided}


def _target_body(url: str, case: str, staging: int | None):
    shardstore.save({"model": SAVED, "step": 3}, url)
    sd = _target(case if _rank() == _world() - 1 else "plain")
    before = _snapshot(sd)
    try:
        shardstore.load(sd, url, **({} if staging is None else {"staging_bytes": staging}))
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        unchanged = all(torch.equal(sd["model"][k], v) for k, v in before.items()) and sd["step"] == -1
        return type(exc).__name__, str(exc), unchanged
    return "ok", all(torch.equal(v.detach(), SAVED[k]) for k, v in sd["model"].items()), sd["step"]


@pytest.mark.parametrize("staging", [None, STREAMED], ids=["all_or_nothing", "streamed"])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unloadable_target_is_refused_before_any_tensor_changes(tmp_path, case, world, staging):
    out = run_ranks(world, _target_body, str(tmp_path / "ck"), case, staging)
    kind, message, unchanged = out[-1]
    assert kind == "UnsupportedInputError" and repr(REFUSED[case]) in message, message
    assert unchanged
    for other_kind, other_message, other_unchanged in out[:-1]:
        assert other_kind == "RemoteRankError" and repr(REFUSED[case]) in other_message, other_message
        assert other_unchanged


@pytest.mark.parametrize("staging", [None, STREAMED], ids=["all_or_nothing", "streamed"])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", LOADABLE)
def test_odd_but_fillable_target_loads(tmp_path, case, world, staging):
    assert run_ranks(world, _target_body, str(tmp_path / "ck"), case, staging) == [("ok", True, 3)] * world


@pytest.mark.parametrize("world", [1, 2])
def test_tied_targets_with_different_saved_values_are_refused(tmp_path, world):
    """a and c are one tensor in the target but differ in the checkpoint: neither may silently win. All or
    nothing, nothing changes; streamed, the other tensors were already copied in, which the error says."""
    url = str(tmp_path / "ck")
    out = run_ranks(world, _target_body, url, "tied_but_saved_different", None)
    kind, message, unchanged = out[-1]
    assert kind == "StateDictMismatchError" and "'model.a' and 'model.c' are one tensor (tied)" in message
    assert unchanged and all(k == "RemoteRankError" and "tied" in m and u for k, m, u in out[:-1])
    kind, message, _ = run_ranks(world, _target_body, url + "2", "tied_but_saved_different", STREAMED)[-1]
    assert kind == "PartialLoadError" and "are one tensor (tied)" in message and "partly loaded" in message
    assert "'model.w'" in message and "'model.a'" not in message.split("partly loaded")[1]
