"""State dict keys too long for a file name get a stable short form (the root record keeps the key), and a
failed load raises ``PartialLoadError`` only on a rank that actually copied tensors in. Part of the hostile
state dict suite (``test_state_dict_inputs.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import dtensor
import shardstore
from shardstore.errors import CorruptCheckpointError, PartialLoadError
from shardstore.flatten import MAX_NAME_BYTES, flatten, keypath_from_node, node_path
from tests.ranks import mesh, run_ranks

STREAMED = 64  # staging_bytes small enough that every load streams batch by batch

LONG = {
    "ascii": "a" * 300,
    "ascii_same_prefix": "a" * 299 + "b",
    "two_byte": "é" * 100,
    "four_byte": "🙂" * 60,
    "escaped": "/" * 90,
    "reserved_start": "__" + "x" * 250,
}


def _long_state(fill: float | None = None) -> dict:
    t = lambda i: torch.arange(4.0) + i if fill is None else torch.full((4,), fill)  # noqa: E731
    model = {name: t(i) for i, name in enumerate(LONG.values())}
    return {"model": model, "nested": {LONG["ascii"]: [t(10), {LONG["four_byte"]: t(11)}]}, "step": 3 if fill is None else -1}


def test_short_forms_fit_a_file_name_and_map_back_through_the_tree():
    _, tree = flatten(_long_state())
    names = [node_path(("model", key)) for key in LONG.values()]
    assert len(set(names)) == len(names)
    for key, name in zip(LONG.values(), names):
        component = name.split("/")[1]
        assert len(component.encode()) <= MAX_NAME_BYTES and "~" in component
        assert node_path(("model", key)) == name  # stable
        assert keypath_from_node(name, tree) == ("model", key)
        with pytest.raises(ValueError, match="short form"):
            keypath_from_node(name.replace("~", "~0"), tree)
    assert node_path(("model", "a" * MAX_NAME_BYTES)) == "model/" + "a" * MAX_NAME_BYTES  # at the limit: as is
    assert node_path(("x", "é" * 100)).split("/")[1].startswith("%C3%A9" * 27 + "~")  # whole characters only


def _long_keys_body(url: str):
    shardstore.save(_long_state(), url)
    target = _long_state(fill=0.0)
    shardstore.load(target, url)
    ckpt = shardstore.open(url)
    expected = _long_state()
    loaded = all(torch.equal(target["model"][k], v) for k, v in expected["model"].items())
    nested = torch.equal(target["nested"][LONG["ascii"]][1][LONG["four_byte"]], expected["nested"][LONG["ascii"]][1][LONG["four_byte"]])
    read = torch.equal(ckpt.read(f"model.{LONG['four_byte']}"), expected["model"][LONG["four_byte"]])
    return loaded and nested and read and target["step"] == 3, sorted(ckpt.keys())


@pytest.mark.parametrize("world", [1, 2])
def test_keys_too_long_for_a_file_name_round_trip(tmp_path, world):
    url = tmp_path / "ck"
    out = run_ranks(world, _long_keys_body, str(url))
    assert all(ok for ok, _ in out), out
    assert f"model.{LONG['ascii']}" in out[0][1] and f"nested.{LONG['ascii']}.0" in out[0][1]
    names = [name for _, dirs, files in os.walk(url) for name in dirs + files]
    assert max(len(n.encode()) for n in names) <= MAX_NAME_BYTES
    tree = json.loads((url / "zarr.json").read_text())["attributes"]["shardstore"]["tree"]
    assert set(tree["dict"]["model"]["dict"]) == set(LONG.values())  # the root record keeps the keys
    run_ranks(world, _long_keys_body, str(tmp_path / "again"))
    assert sorted(p.relative_to(url) for p in url.rglob("*")) == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*"))  # stable names


# -- PartialLoadError only where a tensor was written ----------------------------------------------------


def _rank() -> int:
    return torch.distributed.get_rank()


def _sharded(fill: float | None) -> dict:
    m = mesh((2,))
    values = {k: torch.arange(48.0).reshape(8, 6) + i for i, k in enumerate("abc")}
    model = {k: dtensor.distribute_tensor(v if fill is None else torch.full_like(v, fill), m, [dtensor.Shard(0)],
                                          src_data_rank=None) for k, v in values.items()}
    return {"model": model, "step": 3 if fill is None else -1}


def _load_after_damage(url: str, staging: int, all_or_nothing: bool = False):
    shardstore.save(_sharded(None), url)
    torch.distributed.barrier()
    if _rank() == 0:
        path = Path(url) / "model/a/c.1.0"  # rank 1's half of the first tensor
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    torch.distributed.barrier()
    sd = _sharded(7.0)
    try:
        shardstore.load(sd, url, staging_bytes=staging, all_or_nothing=all_or_nothing)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        sevens = {k: bool((v.to_local() == 7.0).all()) for k, v in sd["model"].items()}
        return type(exc).__name__, str(exc), sevens, sd["step"]
    return "ok", "", {}, sd["step"]


def test_a_damaged_chunk_that_landed_is_a_partial_load_on_every_rank_whose_tensors_changed(tmp_path):
    """Rank 1's first chunk lands in its tensor before its checksum fails: PartialLoadError naming the
    chunk and what changed. Rank 0 loaded its whole share before hearing of it: PartialLoadError too."""
    (kind0, msg0, sevens0, step0), (kind1, msg1, sevens1, step1) = run_ranks(2, _load_after_damage, str(tmp_path / "ck"), STREAMED)
    assert kind1 == "PartialLoadError" and "model/a/c.1.0 inner chunk 0 of 'model.a'" in msg1, msg1
    assert "crc32c mismatch" in msg1 and "'model.a'" in msg1.split("partly loaded")[1] and not sevens1["a"]
    assert step1 == -1  # plain values are filled only after every tensor verified
    assert kind0 == "PartialLoadError" and "rank(s) [1]" in msg0 and "partly loaded" in msg0, msg0
    assert "'model.a', 'model.b', 'model.c'" in msg0 and sevens0 == {"a": False, "b": False, "c": False}


def test_all_or_nothing_load_failing_on_a_chunk_raises_the_plain_error_everywhere(tmp_path):
    out = run_ranks(2, _load_after_damage, str(tmp_path / "ck"), 1 << 30, True)
    assert [kind for kind, *_ in out] == ["RemoteRankError", "CorruptCheckpointError"], out
    assert all(sevens == {"a": True, "b": True, "c": True} and step == -1 for _, _, sevens, step in out)


def test_single_process_load_failing_before_any_byte_lands_is_not_partial(tmp_path):
    """The target is strided, so its chunk goes through scratch memory and fails there, before any copy.
    One tensor: runs land concurrently, so another tensor's run may well land before this one fails."""
    url = str(tmp_path / "ck")
    state = {"model": {"a": torch.arange(64.0)}, "step": 3}
    shardstore.save(state, url)
    path = Path(url) / "model/a/c.0"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    target = {"model": {"a": torch.full((128,), 7.0)[::2]}, "step": -1}
    with pytest.raises(CorruptCheckpointError, match="inner chunk 0 of 'model.a'") as info:
        shardstore.load(target, url, staging_bytes=STREAMED)
    assert not isinstance(info.value, PartialLoadError)
    assert all(bool((v == 7.0).all()) for v in target["model"].values()) and target["step"] == -1
