"""``shardstore.load`` straight from a Hugging Face safetensors checkpoint into DTensors, each rank reading
only its slices (bytes counted at the storage layer)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dtensor
import shardstore
from shardstore.errors import StateDictMismatchError
from shardstore.storage.local import LocalStorage
from tests.ranks import mesh, run_ranks


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"model.embed.weight": torch.randn(50, 16, generator=g), "model.proj.weight": torch.randn(8, 12, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(16, generator=g)}


def _write_sharded(directory: Path) -> None:
    """Two shards and an index, as transformers' save_pretrained lays them out (files by safetensors)."""
    w = _weights()
    files = {"model-00001-of-00002.safetensors": ["model.embed.weight"],
             "model-00002-of-00002.safetensors": ["model.proj.weight", "model.norm.weight"]}
    for name, keys in files.items():
        save_file({k: w[k] for k in keys}, str(directory / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in w.values())},
             "weight_map": {k: name for name, keys in files.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _load_sharded(url: str) -> tuple[bool, int, int, int]:
    m = mesh((2,))
    sd = {"model": {"embed": {"weight": dtensor.zeros(50, 16, device_mesh=m, placements=[dtensor.Shard(0)])},
                    "proj": {"weight": dtensor.zeros(8, 12, dtype=torch.bfloat16, device_mesh=m, placements=[dtensor.Shard(1)])},
                    "norm": {"weight": dtensor.zeros(16, device_mesh=m, placements=[dtensor.Replicate()])}}}
    counted = []
    original = LocalStorage.read_range_into

    def counting(self, key, start, out):
        counted.append(len(memoryview(out).cast("B")))
        return original(self, key, start, out)

    LocalStorage.read_range_into = counting
    try:
        result = shardstore.load(sd, url)
    finally:
        LocalStorage.read_range_into = original
    w = _weights()
    same = all(torch.equal(sd["model"][k]["weight"].full_tensor(), w[f"model.{k}.weight"]) for k in ("embed", "proj", "norm"))
    local = sum(t["weight"].to_local().numel() * t["weight"].to_local().element_size() for t in sd["model"].values())
    return same, sum(counted), local, result.bytes_read


def test_sharded_hf_checkpoint_loads_into_dtensors_each_rank_reading_its_slices(tmp_path):
    _write_sharded(tmp_path)
    for same, counted, local, reported in run_ranks(2, _load_sharded, str(tmp_path)):
        assert same
        assert counted == local == reported  # exactly its shards' bytes: no whole tensors, no other rank's rows
    total = sum(t.numel() * t.element_size() for t in _weights().values())
    assert local < total


def test_single_file_loads_and_mismatches_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_weights(), str(path))
    sd = {k: torch.zeros_like(v) for k, v in _weights().items()}
    result = shardstore.load(sd, str(path))
    assert all(torch.equal(sd[k], v) for k, v in _weights().items()) and result.unexpected == ()
    bad = {k: torch.zeros_like(v) for k, v in _weights().items()}
    bad["model.norm.weight"] = torch.zeros(17)
    bad["extra"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError, match=r"missing from the checkpoint: extra\n  model.norm.weight: shape \(17,\) in the state dict, \(16,\) in the checkpoint"):
        shardstore.load(bad, str(tmp_path))  # the directory holding model.safetensors
    assert all(not v.any() for v in bad.values())  # nothing was copied in
    partial = {"model.norm.weight": torch.zeros(16)}
    result = shardstore.load(partial, str(path), strict=False)
    assert torch.equal(partial["model.norm.weight"], _weights()["model.norm.weight"])
    assert set(result.unexpected) == {"model.embed.weight", "model.proj.weight"}


def _rewrite_header(path: Path, edit) -> None:
    """Replace the JSON header of the safetensors file at ``path`` with ``edit(header)``, data unchanged."""
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + length]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


@pytest.mark.parametrize("edit, says", [
    (lambda h: [1], "the safetensors header is a JSON list, expected an object"),
    (lambda h: {**h, "__metadata__": ["x"]}, "the safetensors __metadata__ is ['x']"),
    (lambda h: {**h, "w": {**h["w"], "shape": [-3, -4]}}, "tensor 'w' has a malformed or unsupported header entry"),
    (lambda h: {**h, "w": {**h["w"], "shape": [3.0, 4]}}, "shape and data_offsets are lists of ints >= 0"),
    (lambda h: {**h, "w": {**h["w"], "data_offsets": [0]}}, "tensor 'w' has a malformed or unsupported header entry"),
    (lambda h: {**h, "w": "F32"}, "tensor 'w' has a malformed or unsupported header entry"),
])
def test_malformed_safetensors_headers_are_refused_naming_the_file(tmp_path, edit, says):
    """Headers that parse as JSON but are not safetensors headers (a list, negative dims whose product
    still matches the bytes, non-int offsets) are refused as damaged, by load and convert alike."""
    from shardstore.cli import main
    from shardstore.errors import CorruptCheckpointError

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(path))
    _rewrite_header(path, edit)
    with pytest.raises(CorruptCheckpointError, match="m.safetensors") as info:
        shardstore.load({"w": torch.zeros(3, 4)}, str(path))
    assert says in str(info.value)
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "zarr"]) == 2


@pytest.mark.parametrize("edit, says", [
    (lambda h: {**h, "w": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 1 << 62]}},
     "tensor 'w' spans bytes [0, 4611686018427387904) of a"),
    (lambda h: {**h, "w": {**h["w"], "data_offsets": [4, 52]}}, "tensor 'w' spans bytes [4, 52) of a"),
    (lambda h: {**h, "v": {"dtype": "F32", "shape": [2], "data_offsets": [40, 48]}}, "tensors 'w' and 'v' overlap"),
])
def test_safetensors_offsets_past_the_end_or_overlapping_are_refused_before_anything_is_written(capsys, tmp_path, edit, says):
    """Offsets are checked against the file's size: a header claiming a tensor of 2**82 bytes in a file of
    a hundred was planned as such (MemoryError, a traceback) instead of refused."""
    from tests.cli.helpers import cli

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(path))
    _rewrite_header(path, edit)
    code, _, err = cli(capsys, "convert", path, tmp_path / "out", "--to", "zarr")
    assert code == 2 and f"{path}: {says}" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def _edit_index(directory: Path, edit) -> None:
    path = directory / "model.safetensors.index.json"
    path.write_text(edit(path.read_text()))


@pytest.mark.parametrize("setup, says", [
    (lambda d: save_file({**load_file(str(d / "model-00002-of-00002.safetensors")), "model.embed.weight": torch.zeros(50, 16)},
                         str(d / "model-00002-of-00002.safetensors")),
     "tensor 'model.embed.weight' is in both model-00001-of-00002.safetensors and model-00002-of-00002.safetensors"),
    (lambda d: _edit_index(d, lambda t: t.replace('"model.norm.weight"', '"model.gone.weight"')),
     "maps tensor 'model.gone.weight' to model-00002-of-00002.safetensors, whose header has no such tensor"),
    (lambda d: _edit_index(d, lambda t: t[:-1]), "model.safetensors.index.json: the safetensors index is not JSON ("),
    (lambda d: _edit_index(d, lambda t: t.replace('"model-00001-of-00002.safetensors"', "[]")),
     "maps tensor 'model.embed.weight' to [], expected a file name"),
])
def test_an_index_that_disagrees_with_its_files_is_refused(capsys, tmp_path, setup, says):
    """The index says which file holds each tensor: a stale copy of a tensor in another file was read in
    its place (the last file read won, the index unheeded), a tensor the index names but no file holds
    was left out silently, and an index that is not JSON or maps to a list failed without naming it."""
    from tests.cli.helpers import cli

    _write_sharded(tmp_path)
    setup(tmp_path)
    code, _, err = cli(capsys, "convert", tmp_path, tmp_path / "out.pt", "--to", "torch")
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "out.pt").exists()


def test_a_shardstore_checkpoint_named_like_safetensors_loads_and_a_missing_file_is_not_found(tmp_path):
    from shardstore.errors import CheckpointNotFoundError

    url = str(tmp_path / "model.safetensors")  # a directory: a shardstore checkpoint, whatever its name
    shardstore.save({"w": torch.arange(3.0)}, url)
    sd = {"w": torch.zeros(3)}
    shardstore.load(sd, url)
    assert torch.equal(sd["w"], torch.arange(3.0))
    with pytest.raises(CheckpointNotFoundError, match="no safetensors file at .*typo.safetensors"):
        shardstore.load({"w": torch.zeros(3)}, str(tmp_path / "typo.safetensors"))


def _raw_file(path: Path, header: bytes, data: bytes) -> None:
    """A safetensors file with exactly ``header`` as its JSON text (duplicate keys and all), then ``data``."""
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


_W = b'"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}'
_DATA = torch.arange(12.0).numpy().tobytes()


@pytest.mark.parametrize("header, data, says", [
    (b"{" + _W + b"," + _W.replace(b"F32", b"I32") + b"}", _DATA, "tensor 'w' twice"),
    (b"{" + _W + b"," + _W + b"}", _DATA, "tensor 'w' twice"),
    (b'{"__metadata__":{"a":"1","a":"2"},' + _W + b"}", _DATA, "'a' twice"),
    (b"{" + _W + b"}", _DATA + b"hidden", "bytes [48, 54) of the data section belong to no tensor"),
    (b"{" + _W.replace(b"[0,48]", b"[4,52]") + b"}", bytes(4) + _DATA, "bytes [0, 4) of the data section belong to no tensor"),
    (b'{"e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},' + _W + b"}", _DATA, "bytes [8, 8) inside 'w'"),
    (b'{"__metadata__":{"format":1},' + _W + b"}", _DATA, "__metadata__ is {'format': 1}, expected an object of strings"),
    (b'{"__metadata__":[],' + _W + b"}", _DATA, "__metadata__ is [], expected an object of strings"),
    (b'{"__metadata__":{"x":NaN},' + _W + b"}", _DATA, "the safetensors header is not JSON"),
    (b"\xef\xbb\xbf{" + _W + b"}", _DATA, "the safetensors header is not JSON"),
    (b'{"w":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[0,0]}}', b"",
     "shape and data_offsets are lists of ints >= 0 whose product fits in 63 bits"),
], ids=["tensor-twice-differing", "tensor-twice", "metadata-key-twice", "trailing-bytes", "leading-gap",
        "empty-tensor-inside-another", "metadata-int", "metadata-list", "nan", "bom", "dims-overflow"])
def test_headers_the_safetensors_format_forbids_are_refused_as_safetensors_refuses_them(tmp_path, header, data, says):
    """A header naming a key twice (the format forbids it: readers disagree on which copy counts, so a
    file could pass review as one tensor and load as another; the safetensors library keeps one
    silently), bytes no tensor covers (a shifted offset, or data hidden in the file), __metadata__ that
    is not strings, and JSON that is not strict JSON were loaded as if sound; the safetensors library
    refuses all but the duplicates, and load refuses them all."""
    from safetensors import SafetensorError

    from shardstore.errors import CorruptCheckpointError

    path = tmp_path / "m.safetensors"
    _raw_file(path, header, data)
    if "twice" not in says:
        with pytest.raises(SafetensorError):
            load_file(str(path))
    target = {"w": torch.zeros(3, 4)}
    with pytest.raises(CorruptCheckpointError, match="m.safetensors") as info:
        shardstore.load(target, str(path), strict=False)
    assert says in str(info.value) and ("not JSON" in says or "not JSON" not in str(info.value))
    assert not target["w"].any()


@pytest.mark.parametrize("header, data", [
    (b"  {" + _W + b"}   ", _DATA),  # leading and trailing spaces
    (b'{"__metadata__":null,' + _W + b"}", _DATA),
    (b'{"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48],"extra":1}}', _DATA),
    (b'{"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"z":{"dtype":"BF16","shape":[2,0],"data_offsets":[48,48]},' + _W + b"}", _DATA),
    (b'{"w":{"dtype":"F32","shape":[3,4],"data_offsets":[4,52]},"v":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}', bytes(4) + _DATA),
], ids=["spaces", "metadata-null", "extra-field", "empty-tensors", "out-of-order"])
def test_headers_the_safetensors_library_accepts_load_the_same_values(tmp_path, header, data):
    path = tmp_path / "m.safetensors"
    _raw_file(path, header, data)
    expected = load_file(str(path))
    target = {k: torch.full_like(v, 7) for k, v in expected.items()}
    shardstore.load(target, str(path))
    assert all(torch.equal(target[k], v) for k, v in expected.items())


@pytest.mark.parametrize("content, says", [
    (b"", "a file of 0 bytes is too short for a safetensors file"),
    (b"\x10\0\0\0\0\0\0\0{}", "a header of 16 bytes runs past the end of the file (10 bytes)"),
], ids=["empty-file", "cut-header"])
def test_files_too_short_for_their_header_say_so(tmp_path, content, says):
    """A zero-length or cut file was reported as a truncated object of a save ('re-run the save')."""
    from shardstore.errors import CorruptCheckpointError

    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match="m.safetensors") as info:
        shardstore.load({"w": torch.zeros(3, 4)}, str(path))
    assert says in str(info.value) and "re-run the save" not in str(info.value)


def _load_with_empty_shards(path: str) -> list[bool]:
    import torch.distributed as dist
    from torch.distributed.tensor import Shard as TorchShard, distribute_tensor

    w = load_file(path)
    uneven = distribute_tensor(torch.zeros(3, 5), mesh((4,)), [TorchShard(0)])  # torch.chunk: rank 3 holds 0 rows
    sub = dtensor.zeros(6, 4, device_mesh=mesh((2,)), placements=[dtensor.Shard(0)])  # ranks 2 and 3 hold nothing
    shardstore.load({"a": uneven, "c": sub}, path)
    return [torch.equal(uneven.full_tensor(), w["a"]), torch.equal(sub.full_tensor(), w["c"]) if dist.get_rank() < 2 else True]


def test_dtensor_targets_with_nothing_on_a_rank_load(tmp_path):
    """A rank whose shard of a tensor is empty (3 rows over 4 ranks, as torch.chunk cuts them) or that is
    outside the tensor's mesh has nothing to read; the load was refused as 'a target holding 0 pieces on
    one rank cannot load from safetensors'."""
    path = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(3)
    save_file({"a": torch.randn(3, 5, generator=g), "c": torch.randn(6, 4, generator=g)}, str(path))
    assert run_ranks(4, _load_with_empty_shards, str(path)) == [[True, True]] * 4


@pytest.mark.parametrize("mapped, error, says", [
    ("../other.safetensors", "UnsafeKeyError", "maps tensor 'model.norm.weight' to '../other.safetensors': a file outside"),
    ("/etc/other.safetensors", "UnsafeKeyError", "maps tensor 'model.norm.weight' to '/etc/other.safetensors': a file outside"),
    ("model-00003-of-00002.safetensors", "MissingChunkError",
     "maps tensor 'model.norm.weight' to model-00003-of-00002.safetensors, which does not exist"),
], ids=["parent", "absolute", "missing"])
def test_an_index_naming_a_file_outside_the_directory_or_missing_is_refused_naming_the_tensor(tmp_path, mapped, error, says):
    """The messages named neither the index nor the tensor: 'unsafe key ... state-dict keys are
    percent-encoded by shardstore.flatten', or a missing object of a save ('re-run the save')."""
    directory = tmp_path / "hf"
    directory.mkdir()
    save_file({"model.norm.weight": torch.ones(16)}, str(tmp_path / "other.safetensors"))
    _write_sharded(directory)
    _edit_index(directory, lambda t: t.replace('"model.norm.weight": "model-00002-of-00002.safetensors"',
                                               f'"model.norm.weight": "{mapped}"'))
    target = {k: torch.zeros_like(v) for k, v in _weights().items()}
    with pytest.raises(Exception) as info:
        shardstore.load(target, str(directory))
    assert type(info.value).__name__ == error
    assert f"{directory}/model.safetensors.index.json" in str(info.value) and says in str(info.value)
    assert "re-run the save" not in str(info.value) and "percent-encoded" not in str(info.value)
    assert not any(t.any() for t in target.values())


def test_an_index_naming_a_tensor_twice_is_refused(tmp_path):
    """JSON keeps the last of two entries for one key, so the tensor was read from whichever file the
    index named last, the other never looked at."""
    from shardstore.errors import CorruptCheckpointError

    _write_sharded(tmp_path)
    _edit_index(tmp_path, lambda t: t.replace('"weight_map": {', '"weight_map": {"model.embed.weight": "model-00002-of-00002.safetensors", '))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.index.json: .*'model.embed.weight' twice"):
        shardstore.load({k: torch.zeros_like(v) for k, v in _weights().items()}, str(tmp_path))


def test_a_safetensors_file_reached_through_a_link_loads_but_links_inside_a_directory_are_refused(capsys, tmp_path):
    """A file URL is the user's choice, as a symlinked checkpoint root is: ``hf_hub_download`` returns a
    link into the cache's blobs, and it was reported as 'nothing is stored there'. Inside a directory
    (a cache snapshot links every file out of it) links are never followed, and the refusal names the
    link; the directory was taken for an interrupted shardstore save ('re-run the save')."""
    from shardstore.errors import CorruptCheckpointError

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    save_file(_weights(), str(blobs / "0123abcd"))
    (snapshot / "model.safetensors").symlink_to(blobs / "0123abcd")
    target = {k: torch.zeros_like(v) for k, v in _weights().items()}
    shardstore.load(target, str(snapshot / "model.safetensors"))
    assert all(torch.equal(target[k], v) for k, v in _weights().items())
    for url in (snapshot, tmp_path / "link-to-snapshot"):
        (tmp_path / "link-to-snapshot").is_symlink() or (tmp_path / "link-to-snapshot").symlink_to(snapshot)
        with pytest.raises(CorruptCheckpointError, match="model.safetensors is a symbolic link") as info:
            shardstore.load({k: torch.zeros_like(v) for k, v in _weights().items()}, str(url))
        assert "re-run the save" not in str(info.value) and "model.safetensors file itself" in str(info.value)

    from tests.cli.helpers import cli

    code, _, err = cli(capsys, "verify", snapshot)
    assert code == 2 and "is a safetensors checkpoint" in err, err
    code, _, err = cli(capsys, "convert", snapshot, tmp_path / "out", "--to", "zarr")
    assert code == 2 and "model.safetensors is a symbolic link" in err and "Traceback" not in err, err


def test_open_of_a_safetensors_file_or_directory_says_what_it_is(tmp_path):
    """``shardstore.open`` reads shardstore checkpoints only: a safetensors file raised a bare
    NotADirectoryError ('[Errno 20] Not a directory: .../zarr.json'), and a safetensors directory was
    called an interrupted save ('re-run the save')."""
    from shardstore.errors import CheckpointNotFoundError, NotACheckpointError

    save_file(_weights(), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors: it is a file, not a checkpoint directory.*safetensors"):
        shardstore.open(str(tmp_path / "model.safetensors"))
    with pytest.raises(NotACheckpointError, match=f"{tmp_path} is a safetensors checkpoint \\(model.safetensors\\), not a "
                                                  "shardstore checkpoint: shardstore.open reads"):
        shardstore.open(str(tmp_path))


def test_a_directory_with_both_model_safetensors_and_an_index_loads_the_file_as_transformers_does(tmp_path):
    """transformers' ``from_pretrained`` looks for ``model.safetensors`` before the index, so a directory
    holding both (a model re-saved unsharded over a sharded one) loads that file; we loaded the shards the
    index names, a different model from the one transformers gives. Where the two disagree on which
    tensors exist, neither is guessed: the refusal names both and the tensors they disagree on."""
    from shardstore.errors import CorruptCheckpointError

    _write_sharded(tmp_path)
    newer = {k: v + 1 for k, v in _weights().items()}
    save_file(newer, str(tmp_path / "model.safetensors"))
    target = {k: torch.zeros_like(v) for k, v in _weights().items()}
    shardstore.load(target, str(tmp_path))
    assert all(torch.equal(target[k], v) for k, v in newer.items())

    save_file({**newer, "lm_head.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    target = {k: torch.zeros_like(v) for k, v in _weights().items()}
    with pytest.raises(CorruptCheckpointError, match=r"both model.safetensors and model.safetensors.index.json.*'lm_head.weight'"):
        shardstore.load(target, str(tmp_path), strict=False)
    assert not any(t.any() for t in target.values())
    shardstore.load(target, str(tmp_path / "model.safetensors"), strict=False)  # the file named: no question
    assert all(torch.equal(target[k], v) for k, v in newer.items())


def _load_keys_held_by_some_ranks(file: str, zarr_url: str) -> dict:
    """Rank 0 asks for every tensor, rank 1 for all but ``model.norm.weight``; then each rank also asks
    for a tensor no file holds. Each load runs from safetensors and from the same tensors saved as zarr."""
    rank = torch.distributed.get_rank()
    shardstore.save(_weights(), zarr_url)
    out = {}
    for fmt, url in (("safetensors", file), ("zarr", zarr_url)):
        names = [k for k in _weights() if rank == 0 or k != "model.norm.weight"]
        target = {k: torch.zeros_like(_weights()[k]) for k in names}
        result = shardstore.load(target, url)
        out[fmt, "loaded"] = all(torch.equal(target[k], _weights()[k]) for k in names)
        out[fmt, "unexpected"] = result.unexpected
        target[f"only.rank{rank}"] = torch.zeros(1)
        with pytest.raises(StateDictMismatchError) as info:
            shardstore.load(target, url)
        out[fmt, "refused"] = f"only.rank{rank}" in str(info.value)
        out[fmt, "missing"] = shardstore.load(target, url, strict=False).missing
    return out


def test_strict_keys_are_checked_across_ranks_as_the_zarr_path_checks_them(tmp_path):
    """A tensor only some ranks ask for is expected (another rank loads it), as ``load`` from zarr judges
    it; each rank checked alone, so rank 1 refused the load with ``strict=True`` for a tensor rank 0
    was loading."""
    save_file(_weights(), str(tmp_path / "model.safetensors"))
    for rank, out in enumerate(run_ranks(2, _load_keys_held_by_some_ranks, str(tmp_path / "model.safetensors"), str(tmp_path / "ck"))):
        for fmt in ("safetensors", "zarr"):
            assert out[fmt, "loaded"] and out[fmt, "unexpected"] == () and out[fmt, "refused"], (rank, fmt, out)
            assert out[fmt, "missing"] == (f"only.rank{rank}",), (rank, fmt, out)


def _load_with_a_bad_state_dict_on_rank_1(file: str) -> str:
    """Rank 1's state dict holds a value no load takes (a set): every rank must raise, none wait."""
    target = {k: torch.zeros_like(v) for k, v in _weights().items()}
    if torch.distributed.get_rank() == 1:
        target["bad"] = {1, 2}
    with pytest.raises(Exception) as info:
        shardstore.load(target, file)
    return f"{type(info.value).__name__}: {info.value}"


def test_a_state_dict_refused_on_one_rank_fails_the_load_on_every_rank(tmp_path):
    """The state dict is read inside the first agreed step: read before it, rank 1's refusal left rank 0
    waiting in a collective until its timeout."""
    save_file(_weights(), str(tmp_path / "model.safetensors"))
    start = time.monotonic()
    errors = run_ranks(2, _load_with_a_bad_state_dict_on_rank_1, str(tmp_path / "model.safetensors"), timeout=60)
    assert errors[1].startswith("UnsupportedInputError") and "'bad'" in errors[1], errors
    assert "'bad'" in errors[0] and "rank 1" in errors[0], errors  # rank 0 learns rank 1's error
    assert time.monotonic() - start < 20


def _load_with_a_refused_storage_option_on(bad_rank: int, url: str) -> str:
    """One rank passes a storage option a local path refuses: every rank must raise, none wait."""
    target = {k: torch.zeros_like(v) for k, v in _weights().items()}
    options = {"anon": True} if torch.distributed.get_rank() == bad_rank else None
    with pytest.raises(Exception) as info:
        shardstore.load(target, url, storage_options=options)
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("bad_rank", [0, 1])
@pytest.mark.parametrize("saved_as", ["safetensors", "zarr"])
def test_a_url_refused_on_one_rank_fails_the_load_on_every_rank(tmp_path, bad_rank, saved_as):
    """Whether a URL holds safetensors is told before the first collective: told by each rank alone, a
    rank whose check raised left the others waiting in the load's first collective until its timeout."""
    url = str(tmp_path / "model.safetensors") if saved_as == "safetensors" else str(tmp_path / "ck")
    if saved_as == "safetensors":
        save_file(_weights(), url)
    else:
        shardstore.save(_weights(), url)
    start = time.monotonic()
    errors = run_ranks(2, _load_with_a_refused_storage_option_on, bad_rank, url, timeout=60)
    assert all("anon" in e for e in errors), errors  # every rank learns what was refused
    assert f"rank {bad_rank}" in errors[1 - bad_rank], errors  # the other rank names the one that failed
    assert time.monotonic() - start < 20
