"""No allocation or loop is sized by a claim the bytes on storage do not back: forged shard indexes,
absurd grids, claimed shapes no object holds, and reads over ``max_read_bytes``."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import shardstore
from shardstore import landing, saving, staged_read
from shardstore import format as fmt
from shardstore.codec import ArrayLayout, ByteRange, check_index_bounds, decode_index, index_nbytes
from shardstore.tiling import choose_inner_chunk_shape
from shardstore.errors import CorruptCheckpointError, MissingChunkError, PartialLoadError
from shardstore.storage import Storage
from shardstore.validate import MIN_AVERAGE_CHUNK_BYTES, SMALL_GRID_CHUNKS, check_sane_grid
from tests.faults.damage import READERS, edit_root, files, forge_index, refused, saved, target, values

MISSING = 2**64 - 1


@pytest.fixture
def small_inner_chunks(monkeypatch):
    """Inner chunks of ~1 KiB, so the 16 KiB tensor ``model.w`` has 16 of them in its one object."""
    monkeypatch.setattr(saving, "choose_inner_chunk_shape", functools.partial(choose_inner_chunk_shape, target_bytes=1024))


@pytest.fixture
def staging(monkeypatch) -> list[int]:
    """The sizes of every staging buffer a load allocates (streamed or all or nothing)."""
    sizes: list[int] = []
    for module in (landing, staged_read):
        real = module.staging_buffer
        monkeypatch.setattr(module, "staging_buffer", lambda n, real=real: sizes.append(n) or real(n))
    return sizes


def _index(url: str, node: str = "model/w", cell: str = "c.0.0") -> tuple[list, int]:
    """The index entries of one object and the size of its chunk data (the object minus its index)."""
    layout = fmt.read_array(Storage(url), node)
    blob = (Storage(url).read(f"{node}/{cell}"))
    return decode_index(layout, blob[-index_nbytes(layout):], "test"), len(blob) - index_nbytes(layout)


FORGERIES = {  # entry 5 of 16, given the entries and the data size, becomes...
    "huge-offset": lambda r, end: {5: (2**62, r[5].nbytes)},
    "huge-length": lambda r, end: {5: (r[5].offset, 2**40)},
    "past-the-end": lambda r, end: {5: (end - 2, r[5].nbytes)},
    "overlapping": lambda r, end: {5: (r[4].offset + 1, r[5].nbytes)},
    "too-short": lambda r, end: {5: (r[5].offset, 3)},
    "half-missing": lambda r, end: {5: (MISSING, r[5].nbytes)},
    "wraps-around": lambda r, end: {5: (2**63, 2**63 + 8)},
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("compressor", [None, "zstd"])
@pytest.mark.parametrize("case", list(FORGERIES))
def test_forged_index_entry_is_refused_before_anything_is_allocated(tmp_path, small_inner_chunks, staging, reader,
                                                                    compressor, case):
    url = saved(tmp_path, compressor=compressor)
    ranges, end = _index(url)
    forge_index(url, "model/w", "c.0.0", FORGERIES[case](ranges, end))
    staging.clear()
    if reader == "load" and compressor is None:
        msg = _refused_as_it_lands(url, end + index_nbytes(fmt.read_array(Storage(url), "model/w")), staging)
    else:
        msg = refused(reader, url, CorruptCheckpointError, tmp_path)
        assert staging == [], "staging memory was allocated for a forged index"
    assert f"{url}/model/w/c.0.0 (shard index of 'model.w'): index entry 5" in msg, msg
    assert "load an earlier checkpoint or re-run the save" in msg


def _refused_as_it_lands(url: str, object_nbytes: int, staging: list[int]) -> str:
    """A streamed load reads an uncompressed object's index with its data, at the offsets its layout
    implies, and checks it as it lands (``object_check.check_runs``): nothing is sized by the forged
    entries, and the load fails once the object has landed, ``PartialLoadError`` naming the tensors
    already changed, its cause the forged index."""
    sd = target()
    with pytest.raises(PartialLoadError) as info:
        shardstore.load(sd, url)
    assert isinstance(info.value.__cause__, CorruptCheckpointError)
    assert "partly loaded" in str(info.value)
    assert sum(staging) <= 2 * object_nbytes + (64 << 10), f"scratch {staging} for an object of {object_nbytes} bytes"
    return str(info.value)


def test_decompression_claim_beyond_what_zstd_can_expand_is_refused():
    layout = ArrayLayout((4096, 4096), torch.float32, (4096, 4096), (4096, 4096), "zstd")  # 64 MiB inner chunk
    with pytest.raises(CorruptCheckpointError, match="cannot decompress to the 67108864 bytes"):
        check_index_bounds(layout, [ByteRange(0, 100)], 100, "w/c.0.0")
    check_index_bounds(layout, [ByteRange(0, 4000)], 4000, "w/c.0.0")  # 3996 bytes may expand that far



@pytest.mark.parametrize("reader", ["load", "all_or_nothing", "read"])
def test_a_compressed_chunk_holding_fewer_bytes_than_its_layout_is_refused_not_zero_filled(tmp_path, reader):
    """float32 chunks whose records both say float64 (the checksum re-sealed): each chunk decompresses to
    half an inner chunk, which numcodecs returns zero-padded; zarr-python refuses it, so must shardstore."""
    from tests.faults.damage import edit_json

    url = str(tmp_path / "ck")
    shardstore.save({"w": torch.arange(1.0, 65.0).reshape(8, 8)}, url, compressor="zstd")
    edit_json(tmp_path / "ck" / "w" / "zarr.json", lambda node: node.update(data_type="float64"))
    edit_root(url, lambda block: block["tensors"]["w"].update(dtype="float64"))
    target = {"w": torch.full((8, 8), -1.0, dtype=torch.float64)}
    with pytest.raises(CorruptCheckpointError, match="the chunk holds 256 bytes.*expected 512 bytes"):
        if reader == "read":
            shardstore.open(url).read("w")
        else:
            shardstore.load(target, url, all_or_nothing=reader == "all_or_nothing")
    assert torch.equal(target["w"], torch.full((8, 8), -1.0, dtype=torch.float64))


def test_zstd_frame_content_size_is_read_from_the_header():
    from numcodecs import Zstd

    from shardstore.codec import _frame_content_size

    for n in (1, 255, 256, 65791, 65792, 1 << 20):  # each width of the field
        assert _frame_content_size(memoryview(Zstd(level=3).encode(np.zeros(n, dtype=np.uint8)))) == n
    assert _frame_content_size(memoryview(b"not a zstd frame")) is None


def _reorder_chunks(url: str, node: str = "model/w", cell: str = "c.0.0") -> None:
    """Store the inner chunks of one (compressed) object in reverse order, as another writer might."""
    import crc32c

    ranges, end = _index(url, node, cell)
    path = Storage(url)
    blob = path.read(f"{node}/{cell}")
    parts, pairs, pos = [], [], 0
    for r in reversed(ranges):
        parts.append(bytes(blob[r.offset:r.stop]))
    offsets = {}
    for i, r in reversed(list(enumerate(ranges))):
        offsets[i] = (pos, r.nbytes)
        pos += r.nbytes
    pairs = np.array([offsets[i] for i in range(len(ranges))], dtype="<u8").tobytes()
    path.write(f"{node}/{cell}", b"".join(parts) + pairs + crc32c.crc32c(pairs).to_bytes(4, "little"))


def test_inner_chunks_in_another_order_are_read_one_by_one(tmp_path, small_inner_chunks):
    url = saved(tmp_path, compressor="zstd")
    _reorder_chunks(url)
    assert [r.offset for r in _index(url)[0]] != sorted(r.offset for r in _index(url)[0])
    w = values()["w"]
    assert torch.equal(shardstore.open(url).read("model.w"), w)
    assert torch.equal(shardstore.open(url).read("model.w", (slice(3, 40), slice(10, 50))), w[3:40, 10:50])
    sd = {"model": {k: torch.zeros_like(v) for k, v in values().items()}, "layers": [torch.zeros(10, dtype=torch.int64)],
          "step": 0}
    shardstore.load(sd, url)
    assert torch.equal(sd["model"]["w"], w)


def _forge_layout(url: str, node: str, **fields) -> None:
    """Give array ``node`` another layout in the root record (re-sealed) and in its own zarr.json alike."""
    edit_root(url, lambda block: block["tensors"][node].update(fields))
    layout = fmt.read_root(Storage(url)).tensors[node].layout
    (Storage(url).write(f"{node}/zarr.json", fmt.array_json(layout).encode()))


@pytest.mark.parametrize("reader", READERS)
def test_object_smaller_than_its_claimed_index_is_refused(tmp_path, staging, reader):
    url = saved(tmp_path)
    _forge_layout(url, "model/w", inner_chunk_shape=[1, 1])  # 4096 inner chunks: a 65540-byte index
    staging.clear()
    msg = refused(reader, url, CorruptCheckpointError, tmp_path)
    assert f"{url}/model/w/c.0.0 (shard index of 'model.w'): the object is" in msg
    assert "the index of 4096 inner chunks alone takes 65540" in msg and staging == []


GRIDS = {
    "absurd-grid": ({"shape": [1 << 22], "dtype": "uint8", "chunk_shape": [1], "inner_chunk_shape": [1]},
                    "a grid of 4194304 inner chunks for 4194304 bytes of data"),
    "absurd-inner-grid": ({"shape": [1 << 22], "dtype": "uint8", "chunk_shape": [1 << 22], "inner_chunk_shape": [2]},
                          "a grid of 2097152 inner chunks for 4194304 bytes of data"),
    "chunk-larger-than-array": ({"chunk_shape": [128], "inner_chunk_shape": [128]},
                                "chunk size 128 along dim 0 is larger than the array's size 10"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", list(GRIDS))
def test_absurd_grid_is_refused_up_front(tmp_path, reader, case):
    url = saved(tmp_path)
    fields, says = GRIDS[case]
    edit_root(url, lambda block: block["tensors"]["model/b"].update(fields))
    msg = refused(reader, url, CorruptCheckpointError, tmp_path)
    assert f"{url}/zarr.json tensor 'model/b'" in msg and says in msg, msg


def test_grid_limits_leave_every_grid_a_save_makes():
    ok = [ArrayLayout((SMALL_GRID_CHUNKS,), torch.uint8, (1,), (1,)),
          ArrayLayout((2 * SMALL_GRID_CHUNKS, MIN_AVERAGE_CHUNK_BYTES), torch.uint8, (1, MIN_AVERAGE_CHUNK_BYTES),
                      (1, MIN_AVERAGE_CHUNK_BYTES)),
          ArrayLayout((0, 5), torch.float32, (1, 5), (1, 5)), ArrayLayout((), torch.bool, (), ())]
    for layout in ok:
        check_sane_grid(layout, "x")
    with pytest.raises(CorruptCheckpointError, match="absurd"):
        check_sane_grid(ArrayLayout((SMALL_GRID_CHUNKS + 1,), torch.uint8, (1,), (1,)), "x")


def test_claimed_huge_shape_reads_only_what_the_objects_hold(tmp_path, staging):
    url = saved(tmp_path)
    _forge_layout(url, "model/w", shape=[1 << 20, 1 << 20])  # 4 TiB claimed, one 16 KiB object stored
    staging.clear()
    before = files(tmp_path)
    ck = shardstore.open(url)
    with pytest.raises(ValueError, match="over this handle's max_read_bytes") as info:
        ck.read("model.w")
    assert type(info.value) is ValueError and staging == []
    assert torch.equal(ck.read("model.w", (slice(0, 64), slice(0, 64))), values()["w"])  # what the object holds
    with pytest.raises(MissingChunkError, match=f"object {url}/model/w/c.1.0 does not exist"):
        ck.read("model.w", (slice(64, 128), slice(0, 64)))
    assert max(staging) < 20000 and files(tmp_path) == before


@pytest.mark.parametrize("limit, says, part", [
    (1024, "slices of at most 4 along dim 0, e.g. read('model.w', (slice(0, 4))), then slice(4, 8)", 4),
    (100, "an int for dim 0 and slices of at most 25 along dim 1, e.g. read('model.w', (0, slice(0, 25)))", None),
])
def test_read_over_the_limit_says_how_to_read_it_in_parts(tmp_path, limit, says, part):
    url = saved(tmp_path)
    ck = shardstore.open(url, max_read_bytes=limit)
    with pytest.raises(ValueError) as info:
        ck.read("model.w")
    msg = str(info.value)
    assert type(info.value) is ValueError and "is 16384 bytes, over this handle's max_read_bytes of" in msg
    assert says in msg and "pass a larger max_read_bytes to shardstore.open()" in msg, msg
    if part:
        pieces = [ck.read("model.w", slice(i, i + part)) for i in range(0, 64, part)]
        assert torch.equal(torch.cat(pieces), values()["w"])
    assert torch.equal(ck.read("model.b", slice(0, 3)), values()["b"][:3])  # small regions still read


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4G"])
def test_max_read_bytes_must_be_a_byte_count(tmp_path, bad):
    with pytest.raises(ValueError, match="max_read_bytes must be a number of bytes"):
        shardstore.open(saved(tmp_path), max_read_bytes=bad)
