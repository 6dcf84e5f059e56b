"""Integrity acceptance: every way a checkpoint can be damaged, misaddressed or misused gives a clear error.

Each damage case is checked through both readers, ``shardstore.load`` (in place) and
``shardstore.open(url).read``, and each error is asserted by type (``shardstore.errors``) and by what its
message names: the key, the object URL (and inner chunk), and what to do. Single-process saves: ranks
add nothing here (across ranks: test_integrity_ranks.py).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

import shardstore
from shardstore import saving
from shardstore import format as fmt
from shardstore.codec import decode_index, index_nbytes
from shardstore.tiling import choose_inner_chunk_shape
from shardstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingChunkError,
    PartialLoadError,
    StateDictMismatchError,
    UnsafeKeyError,
)
from shardstore.flatten import flatten, fqn
from shardstore.storage import Storage

READERS = ["load", "read"]
FIX = ("load an earlier checkpoint", "re-run the save")


# -- helpers -------------------------------------------------------------------------------------------


@pytest.fixture
def small_inner_chunks(monkeypatch):
    """Inner chunks of ~1 KiB, so a 16 KiB tensor has 16 of them (damage can hit one in the middle)."""
    monkeypatch.setattr(saving, "choose_inner_chunk_shape", functools.partial(choose_inner_chunk_shape, target_bytes=1024))


def _values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.arange(10, dtype=torch.int64)}


def _state(values: dict[str, torch.Tensor]) -> dict:
    return {"model": dict(values), "step": 3}


def _zeros_state() -> dict:
    return _state({k: torch.zeros_like(v) for k, v in _values().items()})


def _saved(tmp_path: Path) -> str:
    url = str(tmp_path / "ck")
    shardstore.save(_state(_values()), url)
    return url


def _read(reader: str, url: str, key: str = "model.w"):
    """Read ``key`` from the checkpoint with ``reader``; the error (if any) propagates."""
    if reader == "load":
        shardstore.load(_zeros_state(), url)
    else:
        shardstore.open(url).read(key)


def _shard(url: str, node: str = "model/w", cell: str = "c.0.0") -> Path:
    return Path(url) / node / cell


def _inner_range(url: str, node: str, k: int, cell: str = "c.0.0"):
    layout = fmt.read_array(Storage(url), node)
    blob = _shard(url, node, cell).read_bytes()
    return decode_index(layout, blob[-index_nbytes(layout):], "test")[k], index_nbytes(layout)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _says_fix(message: str) -> bool:
    return any(fix in message for fix in FIX)


def _files_under(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, files in os.walk(root) for f in files}


def _snapshot(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["model"].items()}


def _unchanged(before: dict[str, torch.Tensor], state: dict) -> bool:
    return all(torch.equal(before[k].view(torch.uint8), state["model"][k].view(torch.uint8)) for k in before)


# -- damaged chunks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_flipped_data_byte_names_object_and_inner_chunk(tmp_path, small_inner_chunks, reader):
    url = _saved(tmp_path)
    r, _ = _inner_range(url, "model/w", 5)
    _flip(_shard(url), r.offset + 7)
    with pytest.raises((CorruptCheckpointError, PartialLoadError)) as info:
        _read(reader, url)
    msg = str(info.value)
    assert f"{url}/model/w/c.0.0 inner chunk 5 of 'model.w'" in msg and "crc32c mismatch" in msg and _says_fix(msg)
    if reader == "load":  # the damaged chunk had landed in its target: the load says so, and why
        assert isinstance(info.value, PartialLoadError) and isinstance(info.value.__cause__, CorruptCheckpointError)
        assert "'model.w'" in msg.split("partly loaded")[1]
    # chunks the damage does not touch still read (open reads only what a region needs)
    assert torch.equal(shardstore.open(url).read("model.w", (slice(0, 16), slice(0, 16))), _values()["w"][:16, :16])


@pytest.mark.parametrize("reader", READERS)
def test_flipped_index_byte_is_refused(tmp_path, small_inner_chunks, reader):
    url = _saved(tmp_path)
    path = _shard(url)
    _flip(path, path.stat().st_size - 20)
    # a load reads this uncompressed object's index with its data and checks it as it lands: tensors
    # that landed by then make it a PartialLoadError (caused by the index)
    with pytest.raises((CorruptCheckpointError, PartialLoadError)) as info:
        _read(reader, url)
    if isinstance(info.value, PartialLoadError):
        assert reader == "load" and isinstance(info.value.__cause__, CorruptCheckpointError)
    msg = str(info.value)
    assert f"{url}/model/w/c.0.0" in msg and "shard index" in msg and "'model.w'" in msg and _says_fix(msg)


@pytest.mark.parametrize("reader", READERS)
def test_deleted_chunk_object_is_missing(tmp_path, reader):
    url = _saved(tmp_path)
    _shard(url).unlink()
    with pytest.raises(MissingChunkError) as info:
        _read(reader, url)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"object {url}/model/w/c.0.0 does not exist" in msg and _says_fix(msg)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("where", ["data", "index", "tiny"])
def test_truncated_chunk_object_is_corrupt(tmp_path, small_inner_chunks, reader, where):
    url = _saved(tmp_path)
    path = _shard(url)
    r, index_size = _inner_range(url, "model/w", 9)
    size = path.stat().st_size
    cut = {"data": r.offset + 100, "index": size - index_size // 2, "tiny": 3}[where]
    _truncate(path, cut)
    with pytest.raises(CorruptCheckpointError) as info:
        _read(reader, url)
    msg = str(info.value)
    assert not isinstance(info.value, MissingChunkError)
    assert f"{url}/model/w/c.0.0" in msg and _says_fix(msg)


# -- the root record -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_missing_root_marker_is_incomplete(tmp_path, reader):
    url = _saved(tmp_path)
    (Path(url) / "zarr.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="no root zarr.json: it is incomplete") as info:
        _read(reader, url)
    assert url in str(info.value) and _says_fix(str(info.value))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("made", [False, True], ids=["no-dir", "empty-dir"])
def test_nothing_at_url_is_not_found(tmp_path, reader, made):
    url = tmp_path / "nothing"
    if made:
        url.mkdir()
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint at {url}: nothing is stored there"):
        _read(reader, str(url))


def _edit_root(url: str, edit) -> None:
    """Hand-edit the root record and re-seal its checksum, as a forger would, so deeper checks are tested."""
    path = Path(url) / "zarr.json"
    node = json.loads(path.read_text())
    edit(node["attributes"]["shardstore"], node)
    if isinstance(block := node["attributes"].get("shardstore"), dict):
        block["checksum"] = fmt.root_checksum(block)
    path.write_text(json.dumps(node))


MALFORMED = {
    "invalid-json": (lambda url: (Path(url) / "zarr.json").write_text('{"zarr_format": 3, '), "not valid JSON"),
    "no-shardstore-block": (lambda url: _edit_root(url, lambda b, n: n["attributes"].pop("shardstore")),
                            "a shardstore checkpoint"),
    "wrong-version": (lambda url: _edit_root(url, lambda b, n: b.update(version=3)), "upgrade shardstore"),
    "tensors-not-a-dict": (lambda url: _edit_root(url, lambda b, n: b.update(tensors=[])), "'tensors'"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_root_record_is_corrupt(tmp_path, reader, case):
    url = _saved(tmp_path)
    damage, says = MALFORMED[case]
    damage(url)
    with pytest.raises(CorruptCheckpointError) as info:
        _read(reader, url)
    assert f"{url}/zarr.json" in str(info.value) and says in str(info.value)


# -- hostile keys --------------------------------------------------------------------------------------

HOSTILE = ["..", "../../etc", "/abs", "a/b", "__x", "zarr.json", ".", "", "ünï/κώδ", "c", "%2E%2E", "a\\b", "x\0y"]


def _hostile_state() -> dict:
    t = lambda i: torch.full((3, 2), float(i))  # noqa: E731
    model = {k: t(i) for i, k in enumerate(HOSTILE)}
    return {"model": model, "..": {"..": {"etc": t(100)}}, "zarr.json": [t(101), {"/": t(102)}], "step": ".."}


def test_hostile_keys_round_trip_inside_the_checkpoint(tmp_path):
    url = tmp_path / "ck"
    sd = _hostile_state()
    shardstore.save(sd, str(url))
    written = _files_under(tmp_path)
    assert written and all(url in p.parents for p in written), sorted(map(str, written - _files_under(url)))
    target = _hostile_state()
    for v in flatten(target)[0].values():
        v.zero_()
    shardstore.load(target, str(url))
    expected, got = flatten(sd)[0], flatten(target)[0]
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ck = shardstore.open(str(url))
    assert sorted(ck.keys()) == sorted(fqn(k) for k in expected)
    assert all(torch.equal(ck.read(fqn(k)), v) for k, v in expected.items())
    assert _files_under(tmp_path) == written


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("field", ["path", "entry-key", "both"])
def test_root_record_path_climbing_out_is_refused(tmp_path, reader, field):
    url = str(tmp_path / "run" / "ck")
    shardstore.save(_state(_values()), url)
    # A valid copy of the array just outside the checkpoint: reading it would make the load "succeed".
    evil = tmp_path / "run" / "evil"
    evil.mkdir(parents=True)
    (evil / "c.0.0").write_bytes(_shard(url).read_bytes())
    (evil / "zarr.json").write_bytes((Path(url) / "model/w/zarr.json").read_bytes())

    def edit(block, node):
        tensors = block["tensors"]
        entry = tensors.pop("model/w") if field != "path" else tensors["model/w"]
        if field != "entry-key":
            entry["path"] = "../evil"
        tensors["../evil" if field != "path" else "model/w"] = entry

    _edit_root(url, edit)
    before = _files_under(tmp_path)
    with pytest.raises(UnsafeKeyError, match="would leave the checkpoint root") as info:
        _read(reader, url)
    assert "'../evil'" in str(info.value) and f"{url}/zarr.json" in str(info.value) and _says_fix(str(info.value))
    assert _files_under(tmp_path) == before


# -- state dict mismatch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda sd: sd["model"].update(w=torch.zeros(64, 63)), "model.w: shape"),
        (lambda sd: sd["model"].update(w=torch.zeros(64, 64, dtype=torch.float64)), "model.w: dtype"),
        (lambda sd: sd["model"].update(extra=torch.zeros(2)), "missing from the checkpoint: model.extra"),
        (lambda sd: sd["model"].pop("b"), "in the checkpoint but not in the state dict: model.b"),
    ],
    ids=["shape", "dtype", "missing", "unexpected"],
)
def test_state_dict_mismatch_names_the_key(tmp_path, change, says):
    url = _saved(tmp_path)
    sd = _zeros_state()
    change(sd)
    with pytest.raises(StateDictMismatchError, match="does not match the checkpoint") as info:
        shardstore.load(sd, url)
    assert says in str(info.value) and "strict=False" in str(info.value)


@pytest.mark.parametrize("saved, target, says", [
    ({"a.b": torch.ones(2), "a": {"b": torch.ones(2)}}, {"a": {"b": torch.ones(2)}},
     "in the checkpoint but not in the state dict: a.b (key path ('a.b',))"),
    ({"state": {0: torch.ones(2)}}, {"state": {"0": torch.ones(2)}},
     "missing from the checkpoint: state.0 (key path ('state', '0'))\n  in the checkpoint but not in the state dict: "
     "state.0 (key path ('state', 0))"),
])
def test_a_mismatch_names_keys_sharing_a_dotted_name_by_their_key_paths(tmp_path, saved, target, says):
    shardstore.save(saved, str(tmp_path / "ck"))
    with pytest.raises(StateDictMismatchError) as info:
        shardstore.load(target, str(tmp_path / "ck"))
    assert says in str(info.value)


def test_a_mismatch_over_an_optimizer_without_state_says_strict_false_would_resume_it_empty(tmp_path):
    model = torch.nn.Linear(3, 2)
    trained = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    trained.step()
    shardstore.save({"optim": trained.state_dict()}, str(tmp_path / "ck"))
    fresh = torch.optim.Adam(model.parameters()).state_dict()  # before its first step: no state
    with pytest.raises(StateDictMismatchError) as info:
        shardstore.load({"optim": fresh}, str(tmp_path / "ck"))
    assert "in the checkpoint but not in the state dict: optim.state.0.step" in str(info.value)
    assert "resumes with that state empty" in str(info.value) and "get_state_dict" in str(info.value)
    shardstore.save({"optim": trained.state_dict(), "extra": torch.ones(1)}, str(tmp_path / "ck2"))
    with pytest.raises(StateDictMismatchError) as info:  # other extra keys get no such advice
        shardstore.load({"optim": trained.state_dict()}, str(tmp_path / "ck2"))
    assert "not in the state dict: extra" in str(info.value) and "optimizer" not in str(info.value)


def test_non_strict_load_reports_and_loads_the_rest(tmp_path):
    url = _saved(tmp_path)
    sd = _zeros_state()
    sd["model"].pop("b")
    sd["model"]["extra"] = torch.full((2,), 5.0)
    result = shardstore.load(sd, url, strict=False)
    assert result.missing == ("model.extra",) and result.unexpected == ("model.b",)
    assert torch.equal(sd["model"]["w"], _values()["w"]) and torch.equal(sd["model"]["extra"], torch.full((2,), 5.0))


# -- a failed load leaves the caller's tensors untouched -----------------------------------------------


def _many_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"t{i}": torch.randn(32, 32, generator=g) for i in range(5)}


def test_failed_validation_leaves_tensors_untouched(tmp_path):
    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url)
    sd = _state({k: torch.full_like(v, 7.0) for k, v in _many_values().items()})
    sd["model"]["t2"] = torch.full((32, 31), 7.0)
    sd["step"] = -1
    before = _snapshot(sd)
    with pytest.raises(StateDictMismatchError, match="model.t2: shape"):
        shardstore.load(sd, url)
    assert _unchanged(before, sd) and sd["step"] == -1


def _saved_with_corrupt_last_tensor(tmp_path) -> tuple[str, str]:
    """A checkpoint of ``_many_values`` whose last tensor has a flipped byte in inner chunk 3."""
    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url)
    last = sorted(_many_values())[-1]
    r, _ = _inner_range(url, f"model/{last}", 3)
    _flip(_shard(url, f"model/{last}"), r.offset)
    return url, last


def _sevens() -> dict:
    sd = _state({k: torch.full_like(v, 7.0) for k, v in _many_values().items()})
    sd["step"] = -1
    return sd


def test_all_or_nothing_load_of_a_corrupt_last_chunk_leaves_tensors_untouched(tmp_path, small_inner_chunks):
    url, last = _saved_with_corrupt_last_tensor(tmp_path)
    sd = _sevens()
    before = _snapshot(sd)
    with pytest.raises(CorruptCheckpointError, match=f"inner chunk 3 of 'model.{last}'"):
        shardstore.load(sd, url, all_or_nothing=True)
    assert _unchanged(before, sd) and sd["step"] == -1


# -- overwrite protocol --------------------------------------------------------------------------------


def test_overwrite_protocol(tmp_path):
    url = str(tmp_path / "ck")
    old = _values()
    shardstore.save(_state(old), url)
    new = {k: v + 1 for k, v in old.items()}
    with pytest.raises(CheckpointExistsError, match="pass overwrite=True") as info:
        shardstore.save(_state(new), url)
    assert url in str(info.value)
    sd = _zeros_state()
    shardstore.load(sd, url)
    assert all(torch.equal(sd["model"][k], old[k]) for k in old)
    shardstore.save(_state(new), url, overwrite=True)
    sd = _zeros_state()
    shardstore.load(sd, url)
    assert all(torch.equal(sd["model"][k], new[k]) for k in new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_over_an_interrupted_save_needs_overwrite(tmp_path):
    url = _saved(tmp_path)
    (Path(url) / "zarr.json").unlink()
    with pytest.raises(CheckpointExistsError, match="interrupted save"):
        shardstore.save(_state(_values()), url)
    shardstore.save(_state(_values()), url, overwrite=True)
    sd = _zeros_state()
    shardstore.load(sd, url)
    assert torch.equal(sd["model"]["w"], _values()["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
