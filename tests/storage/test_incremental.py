"""Incremental saves through ``shardstore.save``: the digests file, links, what never links, what is refused."""

from __future__ import annotations

import json
import shutil

import blake3
import pytest
import torch

import shardstore
from shardstore import digests as digests_module
from shardstore.codec import ArrayLayout
from shardstore.digests import DIGESTS, CellHasher, layout_header
from shardstore.errors import CheckpointNotFoundError, CorruptCheckpointError


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"frozen": torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), "lora": torch.randn(4, 16, generator=g)}


def _ino(path) -> int:
    return path.stat().st_ino


def _load(url, like: dict) -> dict:
    target = {k: torch.zeros_like(v) for k, v in like.items()}
    shardstore.load(target, str(url))
    return target


def test_digests_record_the_blake3_of_each_cells_layout_and_values_and_the_object_size(tmp_path):
    state = _state(1)
    shardstore.save(state, str(tmp_path / "a"), incremental=True)
    record = json.loads((tmp_path / "a" / DIGESTS).read_text())
    assert (record["format"], record["version"], record["algorithm"]) == ("shardstore-digests", 2, "blake3")
    assert sorted(record["objects"]) == ["frozen/c.0.0", "lora/c.0.0"]
    for name, value in state.items():
        entry = record["objects"][f"{name}/c.0.0"]
        layout = ArrayLayout(tuple(value.shape), value.dtype, tuple(value.shape), tuple(value.shape))
        expected = blake3.blake3(layout_header(layout, (0, 0)) + value.numpy().tobytes()).hexdigest()
        assert entry == {"digest": expected, "nbytes": (tmp_path / "a" / f"{name}/c.0.0").stat().st_size}


def test_a_plain_save_records_no_digests(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"))
    assert not (tmp_path / "a" / DIGESTS).exists()


def test_only_changed_objects_are_written_and_the_new_step_outlives_the_old(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    result = shardstore.save(_state(2), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert (result.chunks_written, result.chunks_linked) == (2, 1)
    assert result.bytes_written == (tmp_path / "b" / "lora/c.0.0").stat().st_size
    assert _ino(tmp_path / "b" / "frozen/c.0.0") == _ino(tmp_path / "a" / "frozen/c.0.0")
    old, new = (json.loads((tmp_path / step / DIGESTS).read_text())["objects"] for step in "ab")
    assert new["frozen/c.0.0"] == old["frozen/c.0.0"] and new["lora/c.0.0"] != old["lora/c.0.0"]
    shutil.rmtree(tmp_path / "a")  # deleting the old step never breaks the new one
    loaded = _load(tmp_path / "b", _state(0))
    assert all(torch.equal(loaded[k], v) for k, v in _state(2).items())


def test_one_changed_element_of_a_frozen_tensor_is_rewritten(tmp_path):
    state = _state(1)
    shardstore.save(state, str(tmp_path / "a"), incremental=True)
    state["frozen"][17, 3] = torch.nextafter(state["frozen"][17, 3], torch.tensor(float("inf")))  # one ulp
    result = shardstore.save(state, str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert result.chunks_linked == 1  # lora only
    assert _ino(tmp_path / "b" / "frozen/c.0.0") != _ino(tmp_path / "a" / "frozen/c.0.0")
    assert torch.equal(_load(tmp_path / "b", state)["frozen"], state["frozen"])


@pytest.mark.parametrize("other", [
    {"frozen": _state(0)["frozen"].view(torch.int32)},  # the same bytes as another dtype
    {"frozen": _state(0)["frozen"].reshape(16, 32)},  # the same bytes in another shape
])
def test_the_same_bytes_in_another_layout_never_link(tmp_path, other):
    shardstore.save({"frozen": _state(0)["frozen"]}, str(tmp_path / "a"), incremental=True)
    result = shardstore.save(other, str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert result.chunks_linked == 0
    assert _ino(tmp_path / "b" / "frozen/c.0.0") != _ino(tmp_path / "a" / "frozen/c.0.0")
    assert torch.equal(_load(tmp_path / "b", other)["frozen"], other["frozen"])


def test_compressed_objects_link_under_the_same_codec(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True, compressor="zstd")
    result = shardstore.save(_state(2), str(tmp_path / "b"), incremental=str(tmp_path / "a"), compressor="zstd")
    assert result.chunks_linked == 1 and _ino(tmp_path / "b" / "frozen/c.0.0") == _ino(tmp_path / "a" / "frozen/c.0.0")
    assert all(torch.equal(v, _state(2)[k]) for k, v in _load(tmp_path / "b", _state(0)).items())


def test_another_codec_never_links(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    result = shardstore.save(_state(1), str(tmp_path / "b"), incremental=str(tmp_path / "a"), compressor="zstd")
    assert result.chunks_linked == 0
    assert all(torch.equal(v, _state(1)[k]) for k, v in _load(tmp_path / "b", _state(0)).items())


def _async_save_of_unstable_cells(state: dict, url: str, **kwargs):
    return shardstore.async_save(state, url, **kwargs).result()


@pytest.mark.parametrize("save", [shardstore.save, _async_save_of_unstable_cells])  # links on a pool; one by one
def test_an_object_no_longer_of_its_recorded_size_is_written_not_linked(tmp_path, save, monkeypatch):
    from shardstore import async_saver

    # as if staging buffers were reused between waves: each cell is linked or handed on before the next
    monkeypatch.setattr(async_saver, "waves_stay_staged", lambda waves: False)
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    old = tmp_path / "a" / "frozen/c.0.0"
    old.write_bytes(old.read_bytes()[:-1])  # truncated after its save
    result = save(_state(1), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert result.chunks_linked == 1 and _ino(tmp_path / "b" / "frozen/c.0.0") != _ino(old)
    assert torch.equal(_load(tmp_path / "b", _state(0))["frozen"], _state(1)["frozen"])


def test_links_come_from_the_base_whose_digests_were_read_even_once_another_is_swapped_in(tmp_path, monkeypatch):
    from shardstore.incremental import IncrementalWriter

    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    shardstore.save({k: v + 1 for k, v in _state(1).items()}, str(tmp_path / "other"), incremental=True)
    for_save = IncrementalWriter.for_save.__func__

    def then_swapped(cls, incremental, storage_options):  # another save commits at the base's URL meanwhile
        writer = for_save(cls, incremental, storage_options)
        (tmp_path / "a").rename(tmp_path / "a-old")
        (tmp_path / "other").rename(tmp_path / "a")
        return writer

    monkeypatch.setattr(IncrementalWriter, "for_save", classmethod(then_swapped))
    result = shardstore.save(_state(1), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert result.chunks_linked == 2  # from the tree whose digests were read, not the one now at its URL
    assert _ino(tmp_path / "b" / "frozen/c.0.0") == _ino(tmp_path / "a-old" / "frozen/c.0.0")
    loaded = _load(tmp_path / "b", _state(0))
    assert all(torch.equal(loaded[k], v) for k, v in _state(1).items())


def test_a_base_without_digests_links_nothing(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"))
    result = shardstore.save(_state(1), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert result.chunks_linked == 0 and (tmp_path / "b" / DIGESTS).exists()


def test_digests_of_an_older_version_link_nothing(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    sha256_era = {"format": "shardstore-digests", "version": 1, "algorithm": "sha256",
                  "objects": {"frozen/c.0.0": "0" * 64, "lora/c.0.0": "1" * 64}}
    (tmp_path / "a" / DIGESTS).write_text(json.dumps(sha256_era))
    result = shardstore.save(_state(1), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert result.chunks_linked == 0
    assert json.loads((tmp_path / "b" / DIGESTS).read_text())["version"] == 2


@pytest.mark.parametrize("text", [
    '{"format": "shardstore-digests", "version": 2, "algorithm": "blake3", "objects": []}',
    '{"format": "shardstore-digests", "version": 2, "algorithm": "blake3", "objects": {"lora/c.0.0": "ab"}}',
    '{"format": "something else", "version": 2}',
    "not json",
])
def test_a_damaged_digests_file_is_refused_before_anything_is_written(tmp_path, text):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    (tmp_path / "a" / DIGESTS).write_text(text)
    with pytest.raises(CorruptCheckpointError, match=f"{tmp_path / 'a' / DIGESTS} is not a shardstore digests file"):
        shardstore.save(_state(2), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    with pytest.raises(CheckpointNotFoundError):
        shardstore.open(str(tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_incremental_must_be_a_bool_or_a_url(tmp_path):
    with pytest.raises(TypeError, match="incremental must be False, True or the URL of an earlier checkpoint, got 5"):
        shardstore.save(_state(1), str(tmp_path / "a"), incremental=5)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64])
def test_a_cell_that_is_not_contiguous_hashes_as_its_contiguous_copy(monkeypatch, dtype):
    monkeypatch.setattr(digests_module, "_PIECE_BYTES", 64)  # several pieces through the scratch buffer
    whole = torch.randn(6, 10, 8).to(dtype)
    cell = whole[:, 2:7, 1:5]
    layout = ArrayLayout((6, 10, 8), dtype, (6, 5, 4), (6, 5, 4))
    hasher = CellHasher()
    expected = blake3.blake3(layout_header(layout, (0, 0, 0)) + cell.contiguous().view(torch.uint8).numpy().tobytes())
    assert hasher.digest(layout, (0, 0, 0), cell) == expected.hexdigest()
    assert hasher.digest(layout, (0, 0, 0), cell.contiguous()) == expected.hexdigest()
    assert hasher.digest(layout, (0, 1, 0), cell) != expected.hexdigest()  # the cell's place is hashed too


def _frozen_and_lora(lora: float) -> dict:
    frozen = {f"frozen{i}": torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    return frozen | {"lora": torch.full((4, 16), lora)}


@pytest.mark.parametrize("max_staging_bytes", [None, 4096])  # one wave (hashed ahead); a wave per cell
def test_an_async_incremental_save_keeps_the_values_of_the_call(tmp_path, max_staging_bytes):
    shardstore.save(_frozen_and_lora(1.0), str(tmp_path / "a"), incremental=True)
    state = _frozen_and_lora(2.0)
    handle = shardstore.async_save(state, str(tmp_path / "b"), incremental=str(tmp_path / "a"),
                                   max_staging_bytes=max_staging_bytes)
    for value in state.values():
        value.add_(1)  # the next optimizer step, while the save is in flight
    assert handle.result().chunks_linked == 6
    loaded = _load(tmp_path / "b", state)
    assert all(torch.equal(loaded[k], v) for k, v in _frozen_and_lora(2.0).items())


def _plan_of(tensors: dict):
    from shardstore.tiling import choose_inner_chunk_shape
    from shardstore.plan import local_save_plan, merge_save_plans

    return merge_save_plans([local_save_plan(0, tensors, 1)], inner_chunks=choose_inner_chunk_shape)


@pytest.mark.parametrize("stable_cells", [False, True])
def test_each_cell_is_hashed_before_the_next_is_asked_for_unless_cells_stay_put(tmp_path, stable_cells):
    """Staging waves reuse a cell's memory once the next cell is asked for; stable cells are hashed ahead."""
    from shardstore.cell_writer import cells_of, layout_of, write_cells
    from shardstore.incremental import IncrementalWriter
    from shardstore.storage import Storage

    tensors = {(f"t{i}",): torch.full((8, 4), float(i)) for i in range(5)}
    plan = _plan_of(tensors)
    asked: list[int] = []

    def reused_memory():
        for i, (task, data) in enumerate(cells_of(plan, 0, tensors)):
            asked.append(i)
            staged = data.clone()
            yield task, staged
            if not stable_cells:
                staged.fill_(-1.0)  # what a later wave staged into the same buffer would do

    writer = IncrementalWriter()
    dest = Storage(str(tmp_path / "c"))
    changed = writer.changed(dest, plan, reused_memory(), None, stable_cells)
    for i, (task, data) in enumerate(changed):
        assert len(asked) == (min(i + 3, 5) if stable_cells else i + 1)  # two cells hashed ahead, or none
        write_cells(dest, plan, [(task, data)], None, writer.put)
    expected = {f"t{i}/c.0.0": CellHasher().digest(layout_of(plan.arrays[i], None), (0, 0), torch.full((8, 4), float(i)))
                for i in range(5)}
    assert {k: o.digest for k, o in writer.objects.items()} == expected


def _big(seed: int) -> dict:
    return {"w": torch.randn(1024, 1024, generator=torch.Generator().manual_seed(seed))}  # split over threads


def _save_incrementally(root: str) -> None:
    shardstore.save(_big(2), f"{root}/b", incremental=f"{root}/a")


def test_a_forked_child_saves_incrementally_after_its_parent_did(tmp_path):
    """Hashing threads are the hasher's own: a forked child does not inherit a dead thread pool."""
    import multiprocessing

    shardstore.save(_big(1), str(tmp_path / "a"), incremental=True)  # the parent hashes first
    child = multiprocessing.get_context("fork").Process(target=_save_incrementally, args=(str(tmp_path),))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the forked child hung or failed hashing"
    assert torch.equal(_load(tmp_path / "b", _big(0))["w"], _big(2)["w"])


def test_links_from_the_version_an_overwritten_bucket_checkpoint_points_at():
    """On object stores an overwritten checkpoint lives in a version its pointer names (format.md §5)."""
    import uuid

    import fsspec

    from shardstore.storage import CURRENT

    root = f"memory://incremental-{uuid.uuid4().hex}"
    try:
        shardstore.save(_state(0), f"{root}/a", incremental=True)
        shardstore.save(_state(1), f"{root}/a", incremental=True, overwrite=True)
        assert fsspec.filesystem("memory").isfile(f"{root}/a/{CURRENT}")
        result = shardstore.save(_state(2), f"{root}/b", incremental=f"{root}/a")
        assert result.chunks_linked == 1  # frozen, copied server-side from the current version
        target = {k: torch.zeros_like(v) for k, v in _state(0).items()}
        shardstore.load(target, f"{root}/b")
        assert all(torch.equal(target[k], v) for k, v in _state(2).items())
    finally:
        fsspec.filesystem("memory").rm(root.split("://")[1], recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def run_root(request, tmp_path) -> tuple[str, dict | None]:
    """A fresh run root: links are hard links locally, server-side copies on object stores."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    if request.param == "memory":
        import uuid

        return f"memory://shardstore-incremental-{uuid.uuid4().hex}/run", None
    server = request.getfixturevalue("bucket_servers").get(request.param)
    return f"{server.fresh_url()}/run", server.storage_options()


def test_a_latest_step_deleted_by_hand_is_never_linked_from(run_root, monkeypatch):
    """The manager's next save links from the latest step it listed. Deleted by hand before that save,
    the step has no digests left and nothing is linked; deleted while the save links from it, each object
    gone is written instead (a save failed with 'object ... does not exist ... the checkpoint is
    damaged', naming the deleted step). Either way the new step is complete and loads."""
    from shardstore.steps import list_steps, step_url
    from shardstore.storage import Storage

    root, options = run_root
    state = _state(1)
    backend = type(Storage(root, options))
    linking = backend.link_from

    def deleted_by_hand_meanwhile(self, source, key):
        Storage(step_url(root, 3), options).delete_prefix()
        return linking(self, source, key)

    with shardstore.CheckpointManager(root, async_save=False, storage_options=options) as manager:
        manager.save(1, state)
        manager.save(2, state)
        Storage(step_url(root, 2), options).delete_prefix()
        manager.save(3, state)
        monkeypatch.setattr(backend, "link_from", deleted_by_hand_meanwhile)
        manager.save(4, state)
        monkeypatch.undo()
    assert [(e.step, e.complete) for e in list_steps(root, options)] == [(1, True), (4, True)]
    for step in (1, 4):
        loaded = {k: torch.zeros_like(v) for k, v in state.items()}
        shardstore.load(loaded, step_url(root, step), storage_options=options)
        assert all(torch.equal(loaded[k], state[k]) for k in state)
