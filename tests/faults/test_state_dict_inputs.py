"""Hostile state dicts: whatever a state dict holds, save and load do the right thing or refuse it, naming
the key, before any byte is written (save) or any tensor changes (load, in both modes), on every rank.

Multi-rank bodies put the odd entry on the last rank only: one bad rank must fail the step everywhere.
"""

from __future__ import annotations

import os
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest
import torch

import dtensor
import shardstore
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
        return (type(value).__name__, {k: _describe(v) for k, v in value.items()})
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
    # A state dict without a tensor (a step count, a scheduler's state) loaded nothing: the saved values were
    # built into a new dict that was dropped.
    "plain_values_only": lambda: (
        {"step": 3, "sched": {"last_epoch": 7, "lrs": [0.1, 0.2]}},
        {"step": 0, "sched": {"last_epoch": 0, "lrs": [0.0, 0.0]}},
        True,
        {"step": 3, "sched": {"last_epoch": 7, "lrs": [0.1, 0.2]}},
    ),
    # Containers holding no tensor came back as the skeleton's plain dict and tuple, not the target's types.
    "plain_containers_keep_the_targets_types": lambda: (
        {"w": _t(1), "nt": Pair(_t(2), 2), "cfg": OrderedDict(b=1, a=[Pair(1, 2)]), "size": torch.Size([2, 3])},
        {"w": _t(0), "nt": Pair(_t(0), 0), "cfg": OrderedDict(b=0, a=[Pair(0, 0)]), "size": torch.Size([0, 0])},
        True,
        {"w": _t(1), "nt": Pair(_t(2), 2), "cfg": OrderedDict(b=1, a=[Pair(1, 2)]), "size": torch.Size([2, 3])},
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
    elif case == "negated_view":  # one memory, read negated: not a tie (b would load as -a)
        model["b"] = torch._neg_view(model["a"])
    return {"model": model, "step": -1}


LOADABLE = ("parameter", "inference", "transposed", "tied")
REFUSED = {"expanded": "model.w", "meta": "model.w", "overlapping": "model.a", "sparse": "model.w", "negated_view": "model.a"}


def _snapshot(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd["model"].items() if v.device.type != "meta" and v.layout == torch.strided}


def _target_body(url: str, case: str, staging: int | None):
    shardstore.save({"model": SAVED, "step": 3}, url)
    sd = _target(case if _rank() == _world() - 1 else "plain")
    before = _snapshot(sd)
    try:
        shardstore.load(sd, url, **({"all_or_nothing": True} if staging is None else {"staging_bytes": staging}))
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


# -- DTensor targets (ours and torch's) on a (2, 2) mesh ----------------------------------------------------

FULL = torch.arange(24.0).reshape(4, 6)


def _dtensors(full: torch.Tensor, placements, case: str = "plain") -> dict:
    """Our DTensor and torch's holding ``full``; on the last rank ``case`` makes ours odd."""
    m = mesh((2, 2))
    ours = dtensor.distribute_tensor(full, m, placements, src_data_rank=None)
    theirs = dtensor.distribute_tensor(full, m, placements, src_data_rank=None).to_torch()
    if case == "parameter":
        ours, theirs = torch.nn.Parameter(ours), torch.nn.Parameter(theirs)
    elif _rank() == _world() - 1 and case in ("meta", "expanded"):
        local = ours.to_local()
        odd = torch.empty(local.shape, device="meta") if case == "meta" else torch.zeros(local.shape[-1]).expand(local.shape)
        ours = dtensor.DTensor.from_local(odd, m, placements, shape=full.shape, stride=full.stride())
    return {"model": {"ours": ours, "theirs": theirs}, "step": -1}


def _dtensor_body(url: str, case: str, staging: int | None):
    saved = _dtensors(FULL, [dtensor.Shard(0), dtensor.Shard(1)])
    saved["step"] = 3
    shardstore.save(saved, url)
    sd = _dtensors(torch.zeros(4, 6), [dtensor.Shard(1), dtensor.Replicate()], case)
    before = {k: v.to_local().clone() for k, v in sd["model"].items() if not v.to_local().is_meta}
    try:
        shardstore.load(sd, url, **({"all_or_nothing": True} if staging is None else {"staging_bytes": staging}))
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        unchanged = all(torch.equal(sd["model"][k].to_local(), v) for k, v in before.items()) and sd["step"] == -1
        return type(exc).__name__, str(exc), unchanged
    full = {k: torch.equal(v.full_tensor().detach(), FULL) for k, v in sd["model"].items()}
    return "ok", full, (sd["step"], all(isinstance(v, torch.nn.Parameter) for v in sd["model"].values()))


@pytest.mark.parametrize("staging", [None, STREAMED], ids=["all_or_nothing", "streamed"])
def test_dtensor_parameters_that_require_grad_load(tmp_path, staging):
    out = run_ranks(4, _dtensor_body, str(tmp_path / "ck"), "parameter", staging)
    assert out == [("ok", {"ours": True, "theirs": True}, (3, True))] * 4


@pytest.mark.parametrize("staging", [None, STREAMED], ids=["all_or_nothing", "streamed"])
@pytest.mark.parametrize("case", ["meta", "expanded"])
def test_dtensor_with_an_unloadable_local_shard_is_refused_before_any_tensor_changes(tmp_path, case, staging):
    out = run_ranks(4, _dtensor_body, str(tmp_path / "ck"), case, staging)
    assert out[-1][0] == "UnsupportedInputError" and "'model.ours'" in out[-1][1], out[-1]
    assert all(kind == "RemoteRankError" and "'model.ours'" in msg for kind, msg, _ in out[:-1]), out
    assert all(unchanged for *_, unchanged in out)


# -- dtypes and tensor kinds on save ------------------------------------------------------------------------

FLOAT8 = [d for d in (getattr(torch, n, None) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")) if d is not None]


def _every_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)


def _float8_body(url: str, dtype: torch.dtype):
    """A plain (replicated, digested) tensor and a sharded DTensor of every bit pattern of ``dtype``."""
    values = _every_bit_pattern(dtype)
    m = mesh((_world(),))
    state = {"plain": values.clone(), "sharded": dtensor.distribute_tensor(values, m, [dtensor.Shard(0)], src_data_rank=None)}
    shardstore.save(state, url)
    zeros = torch.zeros(16, 16, dtype=torch.uint8).view(dtype)
    target = {"plain": zeros.clone(), "sharded": dtensor.distribute_tensor(zeros, m, [dtensor.Shard(1)], src_data_rank=None)}
    shardstore.load(target, url)
    got = [target["plain"], shardstore.open(url).read("plain")]
    ok = [torch.equal(t.view(torch.uint8), values.view(torch.uint8)) for t in got]
    mine = values.view(torch.uint8).chunk(_world(), dim=1)[_rank()]  # gloo cannot gather float8: compare shards
    return ok + [torch.equal(target["sharded"].to_local().view(torch.uint8), mine)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_every_float8_round_trips_bit_for_bit(tmp_path, dtype, world):
    assert run_ranks(world, _float8_body, str(tmp_path / "ck"), dtype) == [[True, True, True]] * world


def test_conjugate_and_negative_views_are_saved_as_the_values_they_show(tmp_path):
    z = torch.tensor([1 + 2j, -3 + 4j, 5 - 6j])
    state = {"conj": z.conj(), "neg": z.conj().imag, "conj_t": torch.stack([z, z]).conj().t()}
    assert state["conj"].is_conj() and state["neg"].is_neg()
    url = str(tmp_path / "ck")
    shardstore.save(state, url)
    target = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
    shardstore.load(target, url)
    assert all(torch.equal(target[k], v.resolve_conj().resolve_neg()) for k, v in state.items())


def _unstorable(case: str) -> torch.Tensor:
    if case == "sparse":
        return torch.eye(3).to_sparse()
    if case == "sparse_csr":
        return torch.eye(3).to_sparse_csr()
    if case == "meta":
        return torch.empty(3, device="meta")
    if case == "nested":
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    if case == "quantized":
        return torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    if case == "bytes_value":
        return b"\x00"  # not a tensor: refused while flattening, which is a step every rank agrees on too
    return torch.zeros(4, dtype=torch.uint8).view(getattr(torch, case)) if case != "complex32" else torch.zeros(3, dtype=torch.complex32)


UNSTORABLE = ["sparse", "sparse_csr", "meta", "nested", "quantized", "complex32", "bits8", "float4_e2m1fn_x2", "uint4", "bytes_value"]


def _refused_save_body(url: str, case: str):
    """Every rank saves a fine state dict; the last rank's also holds an unstorable entry of its own."""
    state = {"w": torch.ones(4), "step": 1}
    if _rank() == _world() - 1:
        state[f"extra.rank{_rank()}"] = _unstorable(case)
    try:
        shardstore.save(state, url, overwrite=True)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        return type(exc).__name__, str(exc)
    return "ok", ""


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", UNSTORABLE)
def test_unstorable_tensor_is_refused_before_any_byte_is_written(tmp_path, case, world):
    old = str(tmp_path / "old")
    run_ranks(world, _save_plain, old)
    files = _files(str(tmp_path))
    out = run_ranks(world, _refused_save_body, old, case)
    key = repr(f"extra.rank{world - 1}")
    says = "is a bytes" if case == "bytes_value" else "cannot be saved"
    assert out[-1][0] == "UnsupportedInputError" and key in out[-1][1] and says in out[-1][1], out[-1]
    assert all(kind == "RemoteRankError" and key in msg for kind, msg in out[:-1]), out
    assert _files(str(tmp_path)) == files  # the old checkpoint, and nothing else, is there byte for byte


def _save_plain(url: str, user_metadata=None):
    try:
        shardstore.save({"w": torch.ones(4), "step": 1}, url, overwrite=True, user_metadata=user_metadata)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        return type(exc).__name__, str(exc)
    return "ok", ""


NOT_JSON = {
    "object": ({"a": object()}, "user_metadata['a'] is of type object"),
    "nan": ({"loss": float("nan")}, "user_metadata['loss'] is nan"),
    "tuple": ({"shape": (1, 2)}, "user_metadata['shape'] is of type tuple"),
    "int_key": ({"by_step": {3: "x"}}, "user_metadata['by_step'] has the key 3 of type int"),
    "tensor": ({"t": torch.ones(1)}, "user_metadata['t'] is of type Tensor"),
    "not_a_dict": (["run"], "user_metadata is not a dict"),
    "huge_int": ({"seed": 10**4300}, "user_metadata['seed'] is an int of more than 4300 digits"),
}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", sorted(NOT_JSON))
def test_non_json_user_metadata_is_refused_before_any_byte_is_written(tmp_path, case, world):
    metadata, says = NOT_JSON[case]
    fresh, old = str(tmp_path / "fresh"), str(tmp_path / "old")
    run_ranks(world, _save_plain, old)
    files = _files(str(tmp_path))
    for url in (fresh, old):
        for kind, message in run_ranks(world, _save_plain, url, metadata):
            assert kind == "UnsupportedInputError" and says in message, (kind, message)
    assert _files(str(tmp_path)) == files and not os.path.exists(fresh)
    assert shardstore.open(old).user_metadata == {}


def test_targets_the_checkpoint_does_not_fill_are_left_alone(tmp_path):
    """strict=False: a meta or expanded target the checkpoint has no data for is reported missing, not refused."""
    url = str(tmp_path / "ck")
    shardstore.save({"w": _t(1)}, url)
    target = {"w": _t(0), "meta": torch.empty(3, device="meta"), "expanded": torch.zeros(3).expand(2, 3)}
    result = shardstore.load(target, url, strict=False)
    assert torch.equal(target["w"], _t(1)) and sorted(result.missing) == ["expanded", "meta"]


ALL_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)


@pytest.mark.filterwarnings("ignore::UserWarning")  # complex32 and quantized dtypes warn when made
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_torch_dtype_round_trips_or_is_refused_before_any_byte_is_written(tmp_path, dtype):
    try:
        value = torch.arange(6).to(dtype)
    except (RuntimeError, TypeError):  # sub-byte, packed, bits and quantized dtypes: raw storage bytes
        value = torch.zeros(6, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.empty(6, dtype=dtype)
    url = tmp_path / "ck"
    try:
        shardstore.save({"x": value}, str(url))
    except shardstore.UnsupportedInputError as exc:
        assert "'x' cannot be saved" in str(exc) and str(dtype) in str(exc) or "quantized" in str(exc), exc
        assert not url.exists()
        return
    target = {"x": torch.zeros(6, dtype=torch.uint8 if dtype.itemsize == 1 else dtype).view(dtype)}
    shardstore.load(target, str(url))
    assert torch.equal(target["x"].view(torch.uint8), value.view(torch.uint8))


def test_an_unknown_compressor_is_refused_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"compressor='lz4': expected one of \[None, 'zstd'\]"):
        shardstore.save({"w": torch.ones(2)}, str(tmp_path / "ck"), compressor="lz4")
    assert not (tmp_path / "ck").exists()


def test_a_url_that_is_a_file_is_refused_by_save_and_not_found_by_load(tmp_path):
    from shardstore.errors import CheckpointNotFoundError, NotACheckpointError

    path = tmp_path / "ckpt"
    path.write_text("not a checkpoint")
    for overwrite in (False, True):
        with pytest.raises(NotACheckpointError, match="is a file, not a checkpoint directory"):
            shardstore.save({"w": torch.ones(2)}, str(path), overwrite=overwrite)
    with pytest.raises(NotACheckpointError, match="is a file"):
        shardstore.async_save({"w": torch.ones(2)}, str(path)).result()
    with pytest.raises(CheckpointNotFoundError, match="it is a file, not a checkpoint directory"):
        shardstore.load({"w": torch.ones(2)}, str(path))
    assert path.read_text() == "not a checkpoint"


def test_an_empty_target_with_a_stride_0_loads(tmp_path):
    """An empty channels_last tensor has a stride 0 (its batch dim steps over no elements): it was refused
    as one whose elements share memory, though it has none."""
    url = str(tmp_path / "ck")
    shardstore.save({"w": torch.zeros(3, 2, 0, 5), "v": _t(1)}, url)
    target = {"w": torch.empty(3, 2, 0, 5).to(memory_format=torch.channels_last), "v": _t(0)}
    assert 0 in target["w"].stride()
    shardstore.load(target, url)
    assert torch.equal(target["v"], _t(1)) and target["w"].shape == (3, 2, 0, 5)
