"""The two load modes. By default every chunk lands straight in its target (or goes through bounded,
reused scratch memory where it cannot land unchanged) and is verified as it lands: every object is still
checked (present, of the size its layout implies, else its index read) before anything changes, and a
checksum or index failure found later raises ``PartialLoadError`` on every rank whose tensors changed,
naming them. ``all_or_nothing=True`` reads and verifies every chunk on every rank first, and refuses up
front when a rank's share does not fit its ``staging_bytes``. Helpers (saved checkpoints, damage,
snapshots) are the integrity suite's."""

from __future__ import annotations

import pytest
import torch

import shardstore
from shardstore.errors import CorruptCheckpointError, PartialLoadError
from tests.dist.test_integrity import (  # noqa: F401 - small_inner_chunks is a fixture
    _flip,
    _many_values,
    _saved,
    _saved_with_corrupt_last_tensor,
    _sevens,
    _shard,
    _snapshot,
    _state,
    _truncate,
    _unchanged,
    _zeros_state,
    small_inner_chunks,
)
from tests.dist.test_integrity_ranks import _dist_save, _dist_state, _dist_values
from tests.ranks import run_ranks

STAGING = 3000  # bytes: a couple of ~1 KiB inner chunks per buffer, so five 4 KiB tensors take many batches


@pytest.mark.parametrize("target", ["contiguous", "strided"])
def test_default_load_equals_the_saved_values_in_bounded_memory(tmp_path, small_inner_chunks, target):
    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url)
    zeros = {k: torch.zeros_like(v) if target == "contiguous" else torch.zeros(v.shape[1], v.shape[0]).t() for k, v in _many_values().items()}
    sd = _state(zeros)
    result = shardstore.load(sd, url, staging_bytes=STAGING)
    assert result.streamed and 0 < result.staged_bytes <= STAGING + 2 * 8  # two buffers, each <= half (+crc)
    assert all(torch.equal(sd["model"][k], v) for k, v in _many_values().items()) and sd["step"] == 3
    assert result.bytes_read == sum(v.numel() * 4 for v in _many_values().values())
    assert result.bytes_fetched == result.bytes_read + 4 * result.chunks_read  # each chunk's crc32c, no more
    whole = shardstore.load(_state({k: torch.zeros_like(v) for k, v in _many_values().items()}), url, all_or_nothing=True)
    assert not whole.streamed and whole.staged_bytes >= result.bytes_read


def test_chunks_spanning_whole_rows_of_their_target_land_in_it_without_scratch(tmp_path, small_inner_chunks):
    url = str(tmp_path / "ck")
    values = {"v": torch.randn(4096), "m": torch.randn(64, 16)}  # 1 KiB inner chunks: 256 values, 16 rows
    shardstore.save(values, url)
    sd = {k: torch.zeros_like(v) for k, v in values.items()}
    result = shardstore.load(sd, url, staging_bytes=STAGING)
    assert all(torch.equal(sd[k], v) for k, v in values.items())
    # scratch holds checksum slots and each object's index (16 bytes an inner chunk + 4), read with its data
    assert result.chunks_read == 16 + 4 and result.staged_bytes <= 2 * (4 * 20 + 16 * 20 + 4 * 2)


def test_a_load_bumps_the_version_of_what_it_wrote(tmp_path):
    url = str(tmp_path / "ck")
    shardstore.save({"w": torch.arange(6.0)}, url)
    w = torch.nn.Parameter(torch.zeros(6))
    graph = (w * w).sum()  # saved w for backward
    shardstore.load({"w": w}, url)
    assert torch.equal(w.detach(), torch.arange(6.0))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()


@pytest.mark.parametrize("staging", [None, -1, 1.5])
def test_staging_bytes_must_be_a_byte_count(tmp_path, staging):
    url = _saved(tmp_path)
    with pytest.raises(ValueError, match="staging_bytes must be a number of bytes"):
        shardstore.load(_zeros_state(), url, staging_bytes=staging)


@pytest.mark.parametrize("damage", ["delete", "truncate", "append"])
def test_streamed_load_checks_every_object_before_copying(tmp_path, small_inner_chunks, damage):
    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url)
    last = _shard(url, f"model/{sorted(_many_values())[-1]}")
    if damage == "delete":
        last.unlink()
    elif damage == "truncate":
        _truncate(last, last.stat().st_size - 5)
    else:
        last.write_bytes(last.read_bytes() + bytes(8))  # no longer the size its layout implies: its index is read first
    sd = _sevens()
    before = _snapshot(sd)
    with pytest.raises(CorruptCheckpointError) as info:
        shardstore.load(sd, url, staging_bytes=STAGING)
    assert not isinstance(info.value, PartialLoadError), info.value
    assert _unchanged(before, sd) and sd["step"] == -1


def test_streamed_load_names_what_it_wrote_when_a_late_chunk_is_corrupt(tmp_path, small_inner_chunks):
    url, last = _saved_with_corrupt_last_tensor(tmp_path)
    sd = _sevens()
    with pytest.raises(PartialLoadError) as info:
        shardstore.load(sd, url, staging_bytes=STAGING)
    msg = str(info.value)
    assert f"inner chunk 3 of 'model.{last}'" in msg and "partly loaded" in msg and "'model.t0'" in msg
    assert torch.equal(sd["model"]["t0"], _many_values()["t0"])  # written before the damage was reached


def test_a_damaged_index_of_an_uncompressed_object_fails_as_it_lands(tmp_path, small_inner_chunks):
    """An uncompressed object of the size its layout implies is read whole, index and all, in one read;
    its index is checked as it lands, like its chunks."""
    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url)
    last = sorted(_many_values())[-1]
    _flip(_shard(url, f"model/{last}"), _shard(url, f"model/{last}").stat().st_size - 20)
    sd = _sevens()
    with pytest.raises(PartialLoadError) as info:
        shardstore.load(sd, url, staging_bytes=STAGING)
    assert f"(shard index of 'model.{last}')" in str(info.value) and "partly loaded" in str(info.value)
    assert isinstance(info.value.__cause__, CorruptCheckpointError)



def _dist_load(url: str, all_or_nothing: bool) -> tuple[str, str, bool]:
    """Rank 0's staging memory is tiny; rank 1's would hold its whole share."""
    sd = _dist_state({k: torch.full_like(v, 7.0) for k, v in _dist_values().items()})
    staging = 64 if torch.distributed.get_rank() == 0 else 1 << 30
    try:
        shardstore.load(sd, url, staging_bytes=staging, all_or_nothing=all_or_nothing)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        return type(exc).__name__, str(exc), all(bool((v.to_local() == 7.0).all()) for v in sd["model"].values())
    return "no error", "", False


def test_all_or_nothing_refuses_a_share_over_any_ranks_staging_memory_on_every_rank(tmp_path):
    url = str(tmp_path / "ck")
    run_ranks(2, _dist_save, url)
    out = run_ranks(2, _dist_load, url, True)
    assert [kind for kind, *_ in out] == ["ValueError", "ValueError"], out
    assert all("rank 0 needs" in msg and "staging_bytes" in msg and unchanged for _, msg, unchanged in out), out
    assert [kind for kind, *_ in run_ranks(2, _dist_load, url, False)] == ["no error", "no error"]


def test_a_damaged_chunk_that_landed_is_reported_where_tensors_changed(tmp_path):
    url = str(tmp_path / "ck")
    run_ranks(2, _dist_save, url)
    _flip(_shard(url, "model/z_last", "c.1.0"), 0)  # the half rank 1 loads
    (kind0, msg0, _), (kind1, msg1, _) = run_ranks(2, _dist_load, url, False)
    # both ranks had landed chunks in their tensors: rank 1 the damaged one itself, rank 0 its share
    assert (kind0, kind1) == ("PartialLoadError", "PartialLoadError"), (kind0, msg0, kind1, msg1)
    assert "partly loaded" in msg0 and "rank(s) [1]" in msg0 and "inner chunk 0 of 'model.z_last'" in msg1
    assert "crc32c mismatch" in msg1 and "'model.z_last'" in msg1.split("partly loaded")[1]


def test_a_cold_load_reads_runs_of_scratch_chunks_in_place(tmp_path, monkeypatch):
    """Column bands (scratch chunks) read cold land in the scratch buffer with one O_DIRECT read per run,
    no bounce copy, beside row bands landing in their targets; every value arrives and is verified."""
    from shardstore.storage import posix
    from tools.bench_common import evict

    url = str(tmp_path / "ck")
    values = {"bands": torch.randn(4096, 1024), "rows": torch.randn(3000, 7), "odd": torch.randn(1999, 520).to(torch.bfloat16)}
    shardstore.save(values, url)
    placed = []
    real = posix.pread_direct_placed
    monkeypatch.setattr(posix, "pread_direct_placed", lambda fd, offset, length, room: placed.append(length) or real(fd, offset, length, room))
    sd = {k: torch.zeros_like(v) for k, v in values.items()}
    evict(url)
    result = shardstore.load(sd, url)
    assert all(torch.equal(sd[k], v) for k, v in values.items())
    assert sum(placed) >= values["bands"].nbytes and result.bytes_read == sum(v.nbytes for v in values.values())
    _flip(tmp_path / "ck" / "bands" / "c.0.0", 5 << 20)
    evict(url)
    with pytest.raises(PartialLoadError, match="crc32c"):
        shardstore.load({k: torch.zeros_like(v) for k, v in values.items()}, url)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_the_column_bands_of_a_row_block_are_copied_in_one_pass(tmp_path, monkeypatch, dtype):
    """Scratch chunks side by side in a target (a row block's column bands) are copied into it in one
    pass, warm or cold, whatever the dtype; every value arrives. A target whose rows are not contiguous
    (a transposed one) gets them chunk by chunk."""
    from shardstore import landing
    from tools.bench_common import evict

    url = str(tmp_path / "ck")
    values = {"bands": torch.randn(4096, 1024).to(dtype), "edges": torch.randn(1999, 520).to(dtype)}
    shardstore.save(values, url)
    calls = []
    real = landing.copy_side_by_side
    monkeypatch.setattr(landing, "copy_side_by_side", lambda dest, parts, dt: calls.append(real(dest, parts, dt)) or calls[-1])
    for cold in (False, True):
        sd = {k: torch.zeros_like(v) for k, v in values.items()}
        if cold:
            evict(url)
        shardstore.load(sd, url)
        assert all(torch.equal(sd[k], v) for k, v in values.items())
    assert calls and all(calls)
    calls.clear()
    sd = {k: torch.zeros(v.shape[1], v.shape[0], dtype=dtype).t() for k, v in values.items()}
    shardstore.load(sd, url)
    assert all(torch.equal(sd[k], v) for k, v in values.items()) and not any(calls)


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_a_streamed_load_reads_an_uncompressed_objects_index_with_its_data(tmp_path, small_inner_chunks, monkeypatch, compressor):
    """One read per uncompressed object: its size is checked (a stat), its index read with its chunks.
    A compressed object's index says where its chunks are, so it is read first; ``all_or_nothing``
    reads every index first too."""
    from shardstore.storage.local import LocalStorage

    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url, compressor=compressor)
    suffixes: list[str] = []
    real = LocalStorage.read_suffix
    monkeypatch.setattr(LocalStorage, "read_suffix", lambda self, key, n: suffixes.append(key) or real(self, key, n))
    for all_or_nothing in (False, True):
        suffixes.clear()
        sd = _sevens()
        shardstore.load(sd, url, all_or_nothing=all_or_nothing)
        assert all(torch.equal(sd["model"][k], v) for k, v in _many_values().items())
        indexed_first = all_or_nothing or compressor is not None
        assert len(suffixes) == (len(_many_values()) if indexed_first else 0), suffixes


def test_a_loads_scratch_is_kept_for_the_next_load_and_save(tmp_path, monkeypatch):
    """Column bands land through scratch memory; the process keeps it, so the next load lands in the
    same pages (no fresh memory) and the next save encodes into them."""
    from shardstore import buffers, landing

    url = str(tmp_path / "ck")
    values = {"bands": torch.randn(4096, 1024)}  # 16 MiB in column-band inner chunks
    shardstore.save(values, url)
    monkeypatch.setattr(buffers, "_kept", (0, None))  # nothing kept yet
    fresh = []
    real = landing.staging_buffer
    monkeypatch.setattr(landing, "staging_buffer", lambda n: fresh.append(n) or real(n))
    for _ in range(2):
        sd = {"bands": torch.zeros(4096, 1024)}
        result = shardstore.load(sd, url)
        assert torch.equal(sd["bands"], values["bands"]) and result.staged_bytes > 0
    assert fresh == [result.staged_bytes]  # the second load mapped nothing
    kept = buffers._kept[1]
    assert kept is not None and kept.numel() >= result.staged_bytes
    slab = buffers.EncodeSlab(budget=8 << 20, slots=2, kept=True)
    assert slab.take(1 << 20).data_ptr() == kept.data_ptr()


def test_kept_memory_too_small_for_a_load_stays_kept(monkeypatch):
    from shardstore import buffers

    small = torch.empty(4096, dtype=torch.uint8)
    monkeypatch.setattr(buffers, "_kept", (0, None))
    buffers.keep(small)
    assert buffers.take_kept(8192) is None and buffers._kept[1] is small
    assert buffers.take_kept(4096) is small and buffers._kept[1] is None
    buffers.keep(small)
    buffers.keep(torch.empty(1024, dtype=torch.uint8))  # the bigger one stays
    assert buffers._kept[1] is small


def test_a_small_load_through_scratch_is_read_in_several_batches(tmp_path, monkeypatch):
    """Scratch chunks of a load far under ``staging_bytes`` still come in several batches, so the first
    is verified and copied while the next is read (one batch read everything before verifying any)."""
    from shardstore import landing

    url = str(tmp_path / "ck")
    values = {"bands": torch.randn(4096, 1024)}  # 16 MiB in column-band inner chunks: through scratch
    shardstore.save(values, url)
    monkeypatch.setattr(landing, "_BATCH_MIN", 1 << 20)
    fetched = []
    real = landing._fetch_landing
    monkeypatch.setattr(landing, "_fetch_landing", lambda storage, batch, buffer: fetched.append(len(batch)) or real(storage, batch, buffer))
    sd = {"bands": torch.zeros(4096, 1024)}
    result = shardstore.load(sd, url)
    assert torch.equal(sd["bands"], values["bands"])
    assert len(fetched) >= 4 and result.staged_bytes <= 2 * (4 << 20) + 2 * (64 << 10)  # two buffers of a quarter


def test_every_placed_read_of_a_cold_load_gets_block_aligned_room(tmp_path, monkeypatch):
    """Both scratch buffers start block-aligned, whatever the batches hold: a room that did not (the
    second buffer after a batch of odd-sized chunks) was read through the bounce buffer and copied."""
    from shardstore.storage import posix
    from shardstore.storage.direct_io import DirectIO
    from tools.bench_common import evict

    url = str(tmp_path / "ck")
    values = {f"bands{i}": torch.randn(2048, 1024) for i in range(4)}
    values.update({f"odd{i}": torch.randn(1999, 520).to(torch.bfloat16) for i in range(4)})
    shardstore.save(values, url)
    rooms = []
    real = DirectIO.pread_placed
    monkeypatch.setattr(DirectIO, "pread_placed", lambda self, f, start, length, room: rooms.append(posix.address(room)) or real(self, f, start, length, room))
    sd = {k: torch.zeros_like(v) for k, v in values.items()}
    evict(url)
    shardstore.load(sd, url)
    assert all(torch.equal(sd[k], v) for k, v in values.items())
    assert len(rooms) >= 4 and [a % posix.DIRECT_ALIGN for a in rooms] == [0] * len(rooms)


def test_a_one_element_target_with_a_step_lands_in_place(tmp_path):
    """``x[1::2]`` of length one is contiguous (its one dim has size 1) yet its stride is 2: a dtype view
    of it as bytes raised a RuntimeError before any value moved."""
    url = str(tmp_path / "ck")
    shardstore.save({"w": torch.tensor([3.0]), "c": torch.tensor([[1 + 2j]])}, url)
    target = {"w": torch.zeros(3)[1::2], "c": torch.zeros(1, 4, dtype=torch.complex64)[:, 2:3]}
    shardstore.load(target, url)
    assert target["w"].tolist() == [3.0] and target["c"].tolist() == [[1 + 2j]]
