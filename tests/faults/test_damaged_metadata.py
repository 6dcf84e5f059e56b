"""Damaged or hand-edited metadata is refused before anything trusts it: the root record's own checksum,
the full validation of its tree and tensor table, and each array ``zarr.json`` agreeing with it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dtensor
import shardstore
from shardstore import format as fmt
from shardstore.errors import CorruptCheckpointError
from shardstore.storage import Storage
from tests.faults.damage import READERS, STEP, edit_json, edit_root, files, flip_bit, refused, root_file, saved, values
from tests.ranks import mesh, run_ranks

FIX = "load an earlier checkpoint or re-run the save"


# -- the root record's checksum ------------------------------------------------------------------------


def test_every_single_bit_flip_in_the_root_zarr_json_is_detected(tmp_path):
    text = root_file(saved(tmp_path)).read_bytes()
    storage = Storage("memory://every-flip/ck")
    accepted = []
    for byte in range(len(text)):
        for bit in range(8):
            damaged = bytearray(text)
            damaged[byte] ^= 1 << bit
            storage.write(fmt.ZARR_JSON, damaged)
            try:
                fmt.read_root(storage)
            except CorruptCheckpointError as exc:
                assert type(exc) is CorruptCheckpointError and "memory://every-flip/ck/zarr.json" in str(exc)
            else:
                accepted.append((byte, bit))
    assert accepted == [], f"{len(accepted)} of {8 * len(text)} single-bit flips went unnoticed"


def _single_bit_change(old: str, new: str) -> tuple[str, str]:
    diff = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(old) == len(new) and len(diff) == 1 and bin(ord(diff[0][0]) ^ ord(diff[0][1])).count("1") == 1
    return old, new


FLIPS = {  # one bit each, in a number, a string, a key, the commit id and the checksum itself
    "step-7-to-5": _single_bit_change('"value": 7', '"value": 5'),
    "dtype-string": _single_bit_change('"float32"', '"float22"'),
    "shape-number": _single_bit_change('"shape": [64', '"shape": [66'),
    "key-name": _single_bit_change('"user_metadata"', '"user_metadatq"'),
    "tree-key": _single_bit_change('"step": {', '"stdp": {'),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", list(FLIPS))
def test_flipped_bit_in_the_root_record_is_refused(tmp_path, reader, case):
    url = saved(tmp_path)
    old, new = FLIPS[case]
    text = root_file(url).read_text()
    assert text.count(old) == 1, (case, text)
    root_file(url).write_text(text.replace(old, new))
    msg = refused(reader, url, CorruptCheckpointError, tmp_path)
    assert f"{url}/zarr.json: the root record does not match its checksum" in msg and FIX in msg


@pytest.mark.parametrize("field", ["commit_id", "checksum"])
def test_flipped_bit_in_commit_id_or_checksum_is_refused(tmp_path, field):
    url = saved(tmp_path)
    text = root_file(url).read_text()
    flip_bit(root_file(url), text.index(f'"{field}": "') + len(field) + 14, 0)
    msg = refused("load", url, CorruptCheckpointError, tmp_path)
    assert f"{url}/zarr.json" in msg and FIX in msg


def test_root_record_without_checksum_is_refused(tmp_path):
    url = saved(tmp_path)
    edit_root(url, lambda block: block.pop("checksum"), reseal=False)
    msg = refused("load", url, CorruptCheckpointError, tmp_path)
    assert "has no valid checksum" in msg and "'sha256:<hex>'" in msg


def test_step_saved_as_7_loads_as_7(tmp_path):
    url = saved(tmp_path)
    sd = {"model": {k: torch.zeros_like(v) for k, v in values().items()}, "layers": [torch.zeros(10, dtype=torch.int64)],
          "step": 0}
    shardstore.load(sd, url)
    assert sd["step"] == STEP and torch.equal(sd["model"]["w"], values()["w"])


def test_checksum_is_sha256_of_the_canonical_block(tmp_path):
    import hashlib

    block = json.loads(root_file(saved(tmp_path)).read_text())["attributes"]["shardstore"]
    stored = block.pop("checksum")
    canonical = json.dumps(block, sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert stored == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert len(block["commit_id"]) == 32 and int(block["commit_id"], 16) >= 0


def test_every_save_gets_a_fresh_commit_id(tmp_path):
    ids = {fmt.read_root(Storage(saved(tmp_path, f"ck{i}"))).commit_id for i in range(3)}
    assert len(ids) == 3


# -- a re-sealed but hand-edited tree ------------------------------------------------------------------


def _tree(block: dict) -> dict:
    return block["tree"]["dict"]


TREE_EDITS = {
    "unknown-kind": (lambda b: _tree(b).update(step={"pickle": "cos\nsystem"}), "'step'", "a node kind of"),
    "two-entries": (lambda b: _tree(b).update(step={"value": 7, "float": "nan"}), "'step'", "a node with one entry"),
    "value-not-plain": (lambda b: _tree(b).update(step={"value": {"a": 1}}), "'step'", "a value node holding"),
    "bad-float": (lambda b: _tree(b).update(step={"float": "nan2"}), "'step'", "'nan', 'inf' or '-inf'"),
    "root-not-a-dict": (lambda b: b.update(tree={"list": []}), "'<root>'", "a {'dict': {...}} or {'map': [...]} node at the root"),
    "map-bool-key": (lambda b: _tree(b).update(opt={"map": [[True, {"value": 1}]]}), "'opt'", "with str or int keys"),
    "map-key-twice": (lambda b: _tree(b).update(opt={"map": [[0, {"value": 1}], [0, {"value": 2}]]}), "'opt'",
                      "distinct keys in a map node"),
    "tensor-names-another-key": (lambda b: _tree(b)["model"]["dict"].update(w={"tensor": ["model", "b"]}),
                                 "'model.w'", "naming its own key path"),
    "index-as-string": (lambda b: _tree(b)["layers"]["list"].__setitem__(0, {"tensor": ["layers", "0"]}),
                        "'layers.0'", "naming its own key path"),
    "tensor-without-entry": (lambda b: _tree(b)["model"]["dict"].update(ghost={"tensor": ["model", "ghost"]}),
                             "'model.ghost' (node 'model/ghost')", "has no entry for it"),
    "entry-not-in-tree": (lambda b: _tree(b)["model"]["dict"].pop("b"), "'model/b'", "is not in the tree"),
    "entry-path-differs": (lambda b: b["tensors"]["model/w"].update(path="model/x"), "'model/w' has path 'model/x'",
                           "expected the two to be equal"),
    "placements-not-strings": (lambda b: b["tensors"]["model/w"].update(placements=[{"S": 0}]), "tensor 'model/w'",
                               "placements as a list of strings"),
    "node-path-not-the-key-encoding": (lambda b: b["tensors"].update({"model/W": dict(b["tensors"].pop("model/w"),
                                                                                     path="model/W")}),
                                       "'model.w' (node 'model/w')", "has no entry for it"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", list(TREE_EDITS))
def test_hand_edited_tree_is_refused_naming_the_entry(tmp_path, reader, case):
    url = saved(tmp_path)
    edit, entry, says = TREE_EDITS[case]
    edit_root(url, edit)
    msg = refused(reader, url, CorruptCheckpointError, tmp_path)
    assert f"{url}/zarr.json" in msg and entry in msg and says in msg and FIX in msg, msg


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_value_in_the_tree_is_refused(tmp_path, token):
    url = saved(tmp_path)
    text = root_file(url).read_text()
    root_file(url).write_text(text.replace('"value": 7', f'"value": {token}'))
    msg = refused("load", url, CorruptCheckpointError, tmp_path)
    assert f"{url}/zarr.json" in msg


def test_deeply_nested_root_record_is_refused_not_a_crash(tmp_path):
    url = saved(tmp_path)
    root_file(url).write_text('{"zarr_format": 3, "node_type": "group", "attributes": ' + "[" * 100000 + "]" * 100000 + "}")
    msg = refused("load", url, CorruptCheckpointError, tmp_path)
    assert "not valid JSON" in msg


# -- each array's zarr.json agrees with the root record ------------------------------------------------


def _array_json(url: str, node: str = "model/w"):
    return root_file(url).parent / node / "zarr.json"


ARRAY_EDITS = {
    "shape": lambda n: n.update(shape=[64, 32]),
    "dtype": lambda n: n.update(data_type="int32", fill_value=0),
    "chunk-shape": lambda n: (n["chunk_grid"]["configuration"].update(chunk_shape=[32, 64]),
                              n["codecs"][0]["configuration"].update(chunk_shape=[32, 64])),
    "inner-chunk-shape": lambda n: n["codecs"][0]["configuration"].update(chunk_shape=[32, 32]),
    "compressor": lambda n: n["codecs"][0]["configuration"]["codecs"].insert(
        1, {"name": "zstd", "configuration": {"level": 3, "checksum": False}}),
    "separator": lambda n: n["chunk_key_encoding"]["configuration"].update(separator="/"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", list(ARRAY_EDITS))
def test_array_zarr_json_disagreeing_with_the_root_record_is_refused(tmp_path, reader, case):
    url = saved(tmp_path)
    edit_json(_array_json(url), ARRAY_EDITS[case])
    msg = refused(reader, url, CorruptCheckpointError, tmp_path)
    assert f"{url}/model/w/zarr.json: describes" in msg and "but the root zarr.json says shape [64, 64] float32" in msg
    described, said = msg.split("describes ", 1)[1].split(", but the root zarr.json says ", 1)
    assert described != said.split(";")[0], msg  # the two descriptions show the difference
    assert "other Zarr readers would read other values than shardstore" in msg and FIX in msg


def test_zarr_python_reads_what_shardstore_reads_and_a_disagreement_would_differ(tmp_path):
    zarr = pytest.importorskip("zarr")
    url = saved(tmp_path)
    w = values()["w"]
    assert torch.equal(torch.from_numpy(zarr.open_array(f"{url}/model/w", mode="r")[...]), w)
    assert torch.equal(shardstore.open(url).read("model.w"), w)
    edit_json(_array_json(url), ARRAY_EDITS["dtype"])
    reinterpreted = torch.from_numpy(zarr.open_array(f"{url}/model/w", mode="r")[...])
    assert reinterpreted.dtype == torch.int32 and not torch.equal(reinterpreted.to(torch.float32), w)  # other values
    refused("read", url, CorruptCheckpointError, tmp_path)


def test_every_single_bit_flip_in_an_array_zarr_json_is_refused_or_harmless(tmp_path):
    url = saved(tmp_path)
    record = fmt.read_root(Storage(url)).tensors["model/w"]
    text = _array_json(url).read_bytes()
    storage = Storage("memory://array-flips/ck")
    harmless = 0
    for byte in range(len(text)):
        for bit in range(8):
            damaged = bytearray(text)
            damaged[byte] ^= 1 << bit
            storage.write("model/w/zarr.json", damaged)
            try:
                fmt.check_arrays(storage, [record])
            except CorruptCheckpointError:
                continue
            harmless += 1
            assert fmt.read_array(storage, "model/w") == record.layout  # accepted only when it reads the same
    assert harmless < 8 * len(text) // 20, harmless  # only flips in what no reader uses (e.g. "attributes")


def test_a_load_reads_the_array_zarr_jsons_it_needs_concurrently(tmp_path, monkeypatch):
    url = str(tmp_path / "many")
    n = 40
    shardstore.save({f"t{i}": torch.full((3,), float(i)) for i in range(n)}, url)
    calls = []
    real = Storage.read_ranges
    monkeypatch.setattr(Storage, "read_ranges", lambda self, reqs: calls.append(len(reqs)) or real(self, reqs))
    sd = {f"t{i}": torch.zeros(3) for i in range(n)}
    shardstore.load(sd, url)
    assert n in calls and all(math.isclose(sd[f"t{i}"][0].item(), i) for i in range(n))


# -- on several ranks, every rank refuses and none changes its tensors ---------------------------------


def _dist_load_outcome(url: str) -> tuple[str, bool]:
    m = mesh((2,))
    sd = {"model": {k: dtensor.distribute_tensor(torch.full_like(v, 5), m, [dtensor.Shard(0)], src_data_rank=None)
                    for k, v in values().items()}, "layers": [torch.full((10,), 5, dtype=torch.int64)], "step": -1}
    before = {k: v.to_local().clone() for k, v in sd["model"].items()}
    try:
        shardstore.load(sd, url)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        name = type(exc).__name__
    else:
        name = "no error"
    return name, all(torch.equal(before[k], v.to_local()) for k, v in sd["model"].items()) and sd["step"] == -1


def test_two_ranks_refuse_a_flipped_bit_in_the_root_record(tmp_path):
    url = saved(tmp_path)
    old, new = FLIPS["step-7-to-5"]
    root_file(url).write_text(root_file(url).read_text().replace(old, new))
    before = files(tmp_path)
    assert run_ranks(2, _dist_load_outcome, url) == [("CorruptCheckpointError", True)] * 2
    assert files(tmp_path) == before
