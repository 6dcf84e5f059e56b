"""Run directories: step naming and which steps count as complete."""

import os

import pytest
import torch

import shardstore
from shardstore.steps import list_steps, parse_step, step_name, step_url


def test_step_names_are_canonical_decimal():
    assert step_name(0) == "step-0" and step_name(120) == "step-120"
    assert [parse_step(n) for n in ["step-0", "step-120", "step-007", "step-1.staging-ab", "step-", "Step-1", "x"]] == [
        0, 120, None, None, None, None, None]
    assert step_url("memory://run/", 5) == "memory://run/step-5"
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="a step is an int"):
            step_name(bad)


def test_list_steps_marks_only_committed_checkpoints_complete(tmp_path):
    root = tmp_path / "run"
    for step in (10, 2):
        shardstore.save({"w": torch.full((3,), float(step))}, step_url(str(root), step))
    (root / "step-5").mkdir()  # a step whose save was killed before it committed: no root record
    (root / "step-5" / "w").mkdir()
    (root / "step-7").mkdir()  # damaged root record
    (root / "step-7" / "zarr.json").write_text("{not json")
    (root / "step-2.staging-0123").mkdir()  # litter of the commit protocol: not a step
    (root / "notes.txt").write_text("mine")
    entries = list_steps(str(root))
    assert [(e.step, e.complete) for e in entries] == [(2, True), (5, False), (7, False), (10, True)]
    assert entries[0].url == os.path.join(str(root), "step-2")
    assert [e.step for e in entries if e.problem is not None] == [7]  # a root record there, unreadable
    assert "step-7/zarr.json" in entries[2].problem


def damage_root(checkpoint, how: str) -> None:
    """Make a checkpoint's root record unreadable: a changed byte (its checksum no longer matches), or a
    correctly sealed record of a newer format version."""
    import json

    from shardstore import format as fmt

    path = os.path.join(str(checkpoint), "zarr.json")
    with open(path) as f:
        node = json.load(f)
    block = node["attributes"]["shardstore"]
    if how == "flipped":
        block["commit_id"] = "f" + block["commit_id"][1:] if block["commit_id"][0] != "f" else "e" + block["commit_id"][1:]
    else:
        block["version"] = fmt.FORMAT_VERSION + 1
        block["checksum"] = fmt.root_checksum(block)
    with open(path, "w") as f:
        json.dump(node, f)


@pytest.mark.parametrize("how", ["flipped", "newer"])
def test_a_step_whose_root_record_does_not_read_is_reported_and_never_swept(tmp_path, how):
    from shardstore.steps import sweep_litter

    root = tmp_path / "run"
    for step in (1, 2):
        shardstore.save({"w": torch.full((3,), float(step))}, step_url(str(root), step))
    damage_root(root / "step-2", how)
    sweep_litter(str(root))
    entries = list_steps(str(root))
    assert [(e.step, e.complete, e.problem is None) for e in entries] == [(1, True, True), (2, False, False)]
    assert ("checksum" if how == "flipped" else "format version") in entries[1].problem
    assert sorted(p.name for p in (root / "step-2").iterdir()) == ["w", "zarr.json"]


def test_list_steps_of_a_missing_root_is_empty(tmp_path):
    assert list_steps(str(tmp_path / "nothing-here")) == []


def test_sweep_litter_removes_dead_saves_and_keeps_complete_damaged_and_foreign(tmp_path):
    from shardstore.steps import sweep_litter

    root = tmp_path / "run"
    shardstore.save({"w": torch.ones(3)}, step_url(str(root), 1))
    (root / "step-2.staging-0123456789abcdef" / "w").mkdir(parents=True)  # a killed save's tree: its owner lock is free
    (root / "step-2.staging-0123456789abcdef" / ".shardstore-owner").write_bytes(b"")
    (root / "step-3" / "w" / "c").mkdir(parents=True)  # an object-store style killed save: objects, no marker
    (root / "step-3" / "w" / "c" / "0").write_bytes(b"x")
    (root / "step-7").mkdir()
    (root / "step-7" / "zarr.json").write_text("{damaged")
    (root / "notes.txt").write_text("mine")
    sweep_litter(str(root))
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-1", "step-7"]


def test_delete_step_removes_the_marker_first(tmp_path, monkeypatch):
    from shardstore.steps import delete_step
    from shardstore.storage import Storage

    url = step_url(str(tmp_path / "run"), 4)
    shardstore.save({"w": torch.ones(3)}, url)
    checkpoint = Storage(url)
    monkeypatch.setattr(type(checkpoint), "delete_prefix", lambda self, prefix="": (_ for _ in ()).throw(OSError("cut short")))
    with pytest.raises(OSError, match="cut short"):
        delete_step(checkpoint)
    assert [(e.step, e.complete) for e in list_steps(str(tmp_path / "run"))] == [(4, False)]  # never listed half-deleted


def test_step_directories_holding_files_no_save_of_ours_writes_are_never_deleted(tmp_path):
    """A torch DCP checkpoint or a user's notes under a step-like name are not a save of ours cut short:
    the sweep, a manager and ``clear_incomplete`` leave them; deleting a complete step leaves the user's
    files beside its arrays."""
    from shardstore.steps import clear_incomplete, delete_step, sweep_litter
    from shardstore.storage import Storage

    root = tmp_path / "run"
    shardstore.save({"w": torch.ones(3)}, step_url(str(root), 5))
    (root / "step-5" / "notes.txt").write_text("mine")  # beside a complete checkpoint's arrays
    (root / "step-3").mkdir()
    (root / "step-3" / ".metadata").write_bytes(b"dcp")  # another library's checkpoint
    (root / "step-3" / "__0_0.distcp").write_bytes(b"dcp")
    (root / "step-4" / "w").mkdir(parents=True)  # ours, cut short: removed
    (root / "step-4" / "w" / "c.0").write_bytes(b"x")
    sweep_litter(str(root))
    clear_incomplete(step_url(str(root), 3), None)
    with shardstore.CheckpointManager(str(root), async_save=False) as manager:
        assert manager.all_steps() == [5]
    entries = list_steps(str(root))
    assert [(e.step, e.complete) for e in entries] == [(3, False), (5, True)]
    assert "not a shardstore checkpoint" in entries[0].problem and "__0_0.distcp" in entries[0].problem
    assert sorted(p.name for p in (root / "step-3").iterdir()) == [".metadata", "__0_0.distcp"]
    delete_step(Storage(step_url(str(root), 5)))
    assert [p.name for p in (root / "step-5").iterdir()] == ["notes.txt"]



@pytest.fixture(params=["memory", "s3"])
def bucket_root(request) -> tuple[str, dict | None]:
    """A fresh run root on an object store, where a fresh save writes in place under a claim."""
    if request.param == "memory":
        import uuid

        return f"memory://shardstore-steps-{uuid.uuid4().hex}/run", None
    server = request.getfixturevalue("bucket_servers").get(request.param)
    return f"{server.fresh_url()}/run", server.storage_options()


def _claimed_and_half_written(url: str, options: dict | None):
    """A fresh save of ``url`` claimed and midway through writing in place (the protocol's own calls)."""
    from shardstore import commit
    from shardstore.storage import Storage

    target = Storage(url, options)
    claim = commit.begin(target, overwrite=False)
    dest = commit.destination(target, claim, options)
    dest.write("w/zarr.json", b"{}")
    dest.write("w/c/0", b"\x01" * 8)
    return target, dest, claim


def test_an_in_place_save_in_flight_survives_clearing_its_step(bucket_root):
    """On object stores a fresh save writes in place: a claim, objects, no root marker yet. A manager
    clearing that step meanwhile (restarted on another node while the old writer still runs, or a
    second manager on the root) must leave it: the claim cannot tell a live save from a killed one.
    The save then commits with every object it wrote."""
    from shardstore import commit
    from shardstore import format as fmt
    from shardstore.steps import clear_incomplete
    from tests.storage.test_commit import _root

    root, options = bucket_root
    url = step_url(root, 3)
    target, dest, claim = _claimed_and_half_written(url, options)
    clear_incomplete(url, options)
    fmt.write_root(dest, _root(3))
    commit.finish(target, dest, claim)
    assert fmt.read_root(target) == _root(3) and target.read("w/c/0") == b"\x01" * 8
    assert [(e.step, e.complete) for e in list_steps(root, options)] == [(3, True)]


def test_a_manager_saves_again_a_step_whose_in_place_save_was_killed(bucket_root):
    """The kept step does not block the run: the manager saves that step as a new version over it (§5
    overwrite), which commits only if the claimed save has not committed meanwhile, and the killed
    save's objects go."""
    from shardstore import commit
    from shardstore.storage import Storage

    root, options = bucket_root
    with shardstore.CheckpointManager(root, async_save=False, storage_options=options) as manager:
        manager.save(1, {"w": torch.zeros(4)})
    _claimed_and_half_written(step_url(root, 2), options)  # then killed
    with shardstore.CheckpointManager(root, async_save=False, storage_options=options) as manager:
        assert manager.all_steps() == [1]
        assert manager.save(2, {"w": torch.ones(4)})
        assert manager.all_steps() == [1, 2]
        state = {"w": torch.zeros(4)}
        assert manager.restore(state) == 2 and torch.equal(state["w"], torch.ones(4))
    step = Storage(step_url(root, 2), options)
    assert not step.exists(commit.CLAIM) and not step.exists("w/c/0")


@pytest.fixture(params=["local", "memory"])
def any_root(request, tmp_path) -> str:
    """A fresh run root on a local disk (saves rename a staging tree in) or in memory (saves write in place)."""
    if request.param == "local":
        return str(tmp_path / "run")
    import uuid

    return f"memory://shardstore-steps-{uuid.uuid4().hex}/run"


def test_gc_keeps_an_interrupted_step_that_a_save_commits_after_the_listing(any_root, capsys, monkeypatch):
    """``shardstore gc`` lists the run, then deletes the incomplete steps older than the newest complete
    one. A save of such a step (a second writer, an old one still running) that commits between the two
    must keep its checkpoint: the step is judged again under its commit lock, as ``clear_incomplete``
    judges it, and reported kept."""
    from shardstore import runs
    from shardstore.storage import Storage
    from tests.cli.helpers import cli

    url = step_url(any_root, 2)
    shardstore.save({"w": torch.zeros(4)}, step_url(any_root, 3))
    Storage(url).write("w/c/0", b"x")  # a save of step 2 cut short: objects, no root marker
    planned = runs.plan_gc

    def planned_then_committed(entries, keep):
        plan = planned(entries, keep)
        shardstore.save({"w": torch.full((4,), 2.0)}, url, overwrite=True)  # returns: the checkpoint at its URL
        return plan

    monkeypatch.setattr(runs, "plan_gc", planned_then_committed)
    code, out, _ = cli(capsys, "gc", any_root, "--keep", "1")
    state = {"w": torch.zeros(4)}
    shardstore.load(state, url)
    assert torch.equal(state["w"], torch.full((4,), 2.0))
    assert code == 0 and "kept step 2: incomplete, but a save claimed it" in out, out


def test_gc_keeps_an_older_step_whose_in_place_save_is_still_writing(bucket_root):
    """On object stores a fresh save writes in place under a claim. One still writing a step older than
    the newest complete one (an old writer outliving a restart) keeps its objects through a gc, which
    reports the step kept; the save then commits with every object it wrote."""
    from shardstore import commit
    from shardstore import format as fmt
    from shardstore.runs import collect
    from tests.storage.test_commit import _root

    root, options = bucket_root
    shardstore.save({"w": torch.zeros(4)}, step_url(root, 3), storage_options=options)
    target, dest, claim = _claimed_and_half_written(step_url(root, 2), options)
    plans = [collect(root, 1, options, dry_run=dry_run) for dry_run in (True, False)]
    fmt.write_root(dest, _root(2))
    commit.finish(target, dest, claim)
    assert target.read("w/c/0") == b"\x01" * 8
    assert [(e.step, e.complete) for e in list_steps(root, options)] == [(2, True), (3, True)]
    assert all([e.step for e in plan.claimed] == [2] and plan.delete == () for plan in plans), plans


def test_an_overwrite_committing_while_its_step_is_deleted_commits_nothing(bucket_root, monkeypatch):
    """Retention or ``shardstore gc`` deletes a complete step, marker first; a save overwriting that step
    (another process) may reach its commit meanwhile. On object stores an overwritten step is a version
    its pointer names, and deleting the version's marker leaves the pointer, which is all the save's
    commit checks: it moved the pointer to its own version and returned, and the deletion then took
    that version (cut short, it could leave it listed complete with objects missing). The deletion
    holds the step's commit lock, so such a save finds the step gone at its commit and commits nothing;
    a save that returned is the checkpoint at its URL."""
    import queue
    import threading

    from shardstore import format as fmt
    from shardstore.runs import collect
    from shardstore.storage.remote import FsspecStorage

    root, options = bucket_root
    url = step_url(root, 3)
    for value in (1.0, 2.0):  # the second save is an overwrite: a version named by the pointer
        shardstore.save({"w": torch.full((4,), value)}, url, overwrite=True, storage_options=options)
    shardstore.save({"w": torch.zeros(4)}, step_url(root, 4), storage_options=options)
    outcome: queue.Queue = queue.Queue()

    def overwrite() -> None:
        try:
            shardstore.save({"w": torch.full((4,), 7.0)}, url, overwrite=True, storage_options=options)
            outcome.put("ok")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome.put(type(exc).__name__)

    deleting, racer = FsspecStorage.delete, threading.Thread(target=overwrite)

    def delete_then_race(self, key):
        deleting(self, key)
        if key == fmt.ZARR_JSON and "/step-3/.v-" in self.url and not racer.is_alive() and outcome.empty():
            racer.start()
            try:
                outcome.put(outcome.get(timeout=3))  # committed at once, or waiting for the commit lock
            except queue.Empty:
                pass

    monkeypatch.setattr(FsspecStorage, "delete", delete_then_race)
    collect(root, 1, options)
    racer.join(60)
    result = outcome.get(timeout=1)
    assert result in ("ok", "ConcurrentSaveError"), result
    if result == "ok":
        state = {"w": torch.zeros(4)}
        shardstore.load(state, url, storage_options=options)
        assert torch.equal(state["w"], torch.full((4,), 7.0))
    assert [(e.step, e.complete) for e in list_steps(root, options)] == [(4, True)]
