"""``shardstore inspect``, ``verify``, ``ls``, ``gc`` and ``diff`` on real checkpoints, good and damaged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dtensor
import shardstore
from shardstore.runs import plan_gc
from shardstore.steps import StepEntry, step_url
from tests.cli.helpers import REPO, cli, cli_json, run_script
from tests.ranks import mesh, run_ranks

W = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)


def _save_sharded(url: str) -> None:
    """A 2x2 mesh: w split in rows and columns, b split in rows and replicated over columns."""
    m = mesh((2, 2))
    w = dtensor.distribute_tensor(W, m, [dtensor.Shard(0), dtensor.Shard(1)])
    b = dtensor.distribute_tensor(torch.arange(5.0).to(torch.bfloat16), m, [dtensor.Shard(0), dtensor.Replicate()])
    shardstore.save({"model": {"w": w, "b": b}, "step": 7}, url, user_metadata={"run": "demo"})


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("cli") / "ck")
    run_ranks(4, _save_sharded, url)
    return url


def test_inspect_text_shows_tree_layout_and_owner_blocks(capsys, sharded):
    code, out, err = cli(capsys, "inspect", sharded)
    assert code == 0, err
    assert "2 tensors" in out and 'user metadata: {"run": "demo"}' in out and "step = 7" in out
    assert "w: float32[4, 6] 96 B  chunks [2, 3] inner [2, 3]  mesh [2, 2] [S(0), S(1)]" in out
    assert "b: bfloat16[5] 10 B  chunks [3] inner [3]  mesh [2, 2] [S(0), R]" in out
    art = ("+--------+--------+\n| 0      | 1      |  rows 0:2\n+--------+--------+\n"
           "| 2      | 3      |  rows 2:4\n+--------+--------+\n cols 0:3 cols 3:6")
    assert art in out


def test_inspect_one_key_and_json(capsys, sharded):
    code, doc = cli_json(capsys, "inspect", sharded)
    assert code == 0
    assert doc["user_metadata"] == {"run": "demo"} and doc["nbytes"] == 106
    assert doc["tensors"]["model.w"] == {
        "path": "model/w", "shape": [4, 6], "dtype": "float32", "nbytes": 96, "chunk_shape": [2, 3],
        "inner_chunk_shape": [2, 3], "compressor": None, "mesh_shape": [2, 2], "placements": ["S(0)", "S(1)"]}
    assert doc["tree"] == {"model": {"w": {"tensor": "model.w"}, "b": {"tensor": "model.b"}}, "step": 7}
    code, out, _ = cli(capsys, "inspect", sharded, "model.w")
    assert code == 0 and out.startswith("model.w: float32[4, 6]") and "| 2      | 3      |" in out
    code, out, err = cli(capsys, "inspect", sharded, "model.nope")
    assert code == 2 and "'model.nope' is not a tensor of checkpoint" in err and "model.w" in err


def test_verify_good_checkpoint(capsys, sharded):
    code, out, _ = cli(capsys, "verify", sharded)
    assert code == 0 and out.strip().endswith("OK (2 tensors, 6 objects, 6 inner chunks, 132 B verified)")


def _damaged_copy(sharded: str, tmp_path: Path) -> str:
    url = str(tmp_path / "bad")
    shardstore.save({"w": W.repeat(256, 1), "b": torch.ones(3)}, url)  # w: 1024 x 6, one object
    obj = Path(url) / "w" / "c.0.0"
    data = bytearray(obj.read_bytes())
    data[100] ^= 0x40  # inside inner chunk 0
    obj.write_bytes(data)
    (Path(url) / "b" / "c.0").unlink()
    return url


def test_verify_names_each_bad_chunk_and_exits_1(capsys, sharded, tmp_path):
    url = _damaged_copy(sharded, tmp_path)
    before = {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}
    code, out, _ = cli(capsys, "verify", url)
    assert code == 1
    assert f"BAD w chunk [0, 0] inner chunk 0: {url}/w/c.0.0 inner chunk 0 of 'w': crc32c mismatch" in out
    assert f"BAD b chunk [0]: object {url}/b/c.0 does not exist" in out
    assert "FAILED: 2 bad chunk(s)" in out
    code, doc = cli_json(capsys, "verify", url)
    assert code == 1 and doc["ok"] is False
    assert [(b["key"], b["chunk"], b["inner_chunk"]) for b in doc["bad"]] == [("w", [0, 0], 0), ("b", [0], None)]
    assert {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()} == before  # verify changes nothing


def test_verify_incomplete_is_a_failed_check_and_nothing_is_an_input_error(capsys, tmp_path):
    url = tmp_path / "half"
    shardstore.save({"w": torch.ones(2)}, str(url))
    (url / "zarr.json").unlink()  # as if the save was killed before its commit marker
    code, out, _ = cli(capsys, "verify", str(url))
    assert code == 1 and "FAILED: IncompleteCheckpointError" in out
    code, _, err = cli(capsys, "verify", str(tmp_path / "nothing"))
    assert code == 2 and f"shardstore verify: error: no checkpoint at {tmp_path / 'nothing'}" in err


def test_verify_of_a_record_naming_a_path_outside_the_checkpoint_is_a_failed_check(capsys, tmp_path):
    from tests.faults.damage import edit_root

    url = tmp_path / "forged"
    shardstore.save({"w": torch.ones(2)}, str(url))
    edit_root(str(url), lambda block: block["tensors"]["w"].update(path="../evil"))
    code, out, _ = cli(capsys, "verify", str(url))
    assert code == 1 and "FAILED: UnsafeKeyError" in out and "'../evil'" in out, out


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    assert cli(capsys, "inspect")[0] == 2
    assert cli(capsys, "gc", "/x")[0] == 2  # --keep is required
    for command in ("inspect", "verify", "ls", "gc", "unlock", "diff", "convert", "reshard"):
        code, out, _ = cli(capsys, command, "--help")
        assert code == 0 and "--json" in out and "--storage-option" in out, command


def _run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    for step in (1, 2, 3, 5):
        shardstore.save({"w": torch.full((100,), float(step))}, step_url(str(root), step), user_metadata={"step": step})
    (root / "step-4").mkdir()  # killed save, older than the newest complete step
    (root / "step-4" / "w").mkdir()
    (root / "step-9" / "w").mkdir(parents=True)  # incomplete and newest: maybe a save in progress
    (root / "step-9" / "w" / "c.0").write_bytes(b"x")
    (root / "notes.txt").write_text("mine")
    return root


def test_ls_lists_steps_with_size_time_and_state(capsys, tmp_path):
    root = _run(tmp_path)
    code, out, _ = cli(capsys, "ls", str(root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "SIZE", "OBJECTS", "TIME", "(UTC)", "STATE"]
    assert [(line.split()[0], line.split()[-1]) for line in lines[1:]] == [
        ("1", "complete"), ("2", "complete"), ("3", "complete"), ("4", "INCOMPLETE"), ("5", "complete"), ("9", "INCOMPLETE")]
    code, doc = cli_json(capsys, "ls", str(root))
    sizes = {d["step"]: d["nbytes"] for d in doc}
    expected = sum(p.stat().st_size for p in (root / "step-5").rglob("*") if p.is_file())
    assert sizes[5] == expected and sizes[9] == 1 and sizes[4] == 0
    assert abs(doc[-2]["modified"] - os.stat(root / "step-5" / "zarr.json").st_mtime) < 1e-3


def test_gc_keeps_newest_complete_spares_in_progress_and_leaves_other_files(capsys, tmp_path):
    root = _run(tmp_path)
    code, doc = cli_json(capsys, "gc", str(root), "--keep", "2", "--dry-run")
    assert code == 0 and [d["step"] for d in doc["deleted"]] == [1, 2, 4]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-1", "step-2", "step-3", "step-4", "step-5", "step-9"]
    code, out, _ = cli(capsys, "gc", str(root), "--keep", "2")
    assert code == 0 and "deleted step 4 (incomplete)" in out and "kept step 9: incomplete" in out
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-3", "step-5", "step-9"]
    assert shardstore.open(str(root / "step-5")).read("w")[0] == 5.0
    code, _, err = cli(capsys, "gc", str(root), "--keep", "0")
    assert code == 2 and "keep must be an int >= 1" in err


def test_ls_and_gc_of_a_root_holding_nothing_are_input_errors(capsys, tmp_path):
    for command in (["ls"], ["gc", "--keep", "1"]):
        code, out, err = cli(capsys, *command[:1], str(tmp_path / "typo"), *command[1:])
        assert code == 2 and f"nothing is stored under {tmp_path / 'typo'}" in err and out == ""
    (tmp_path / "run" / "other").mkdir(parents=True)  # a run directory with files but no steps yet
    code, out, _ = cli(capsys, "ls", str(tmp_path / "run"))
    assert code == 0 and "(no step-<N> checkpoints" in out


def test_plan_gc_never_deletes_the_newest_complete_step():
    entries = [StepEntry(s, f"r/step-{s}", c) for s, c in [(1, True), (2, False), (3, True), (4, False)]]
    plan = plan_gc(entries, 1)
    assert [e.step for e in plan.keep] == [3] and [e.step for e in plan.delete] == [1, 2]
    assert [e.step for e in plan.spared] == [4]
    only_incomplete = plan_gc([StepEntry(1, "r/step-1", False)], 3)
    assert only_incomplete.delete == () and [e.step for e in only_incomplete.spared] == [1]


def test_plan_gc_keeps_an_older_incomplete_step_a_save_has_claimed():
    entries = [StepEntry(1, "r/step-1", False, claimed=True), StepEntry(2, "r/step-2", False), StepEntry(3, "r/step-3", True),
               StepEntry(4, "r/step-4", False, claimed=True)]
    plan = plan_gc(entries, 1)
    assert [e.step for e in plan.delete] == [2] and [e.step for e in plan.claimed] == [1]
    assert [e.step for e in plan.spared] == [4]


def test_plan_gc_never_deletes_a_step_whose_root_record_does_not_read():
    entries = [StepEntry(1, "r/step-1", False, "damaged"), StepEntry(2, "r/step-2", True), StepEntry(3, "r/step-3", True),
               StepEntry(4, "r/step-4", False, "newer format")]
    plan = plan_gc(entries, 1)
    assert [e.step for e in plan.keep] == [3] and [e.step for e in plan.delete] == [2]
    assert [e.step for e in plan.unreadable] == [1, 4] and plan.spared == ()


def test_gc_and_ls_keep_and_report_steps_whose_root_record_does_not_read(capsys, tmp_path):
    from tests.storage.test_steps import damage_root

    root = tmp_path / "run"
    for step in (1, 2, 3):
        shardstore.save({"w": torch.full((2,), float(step))}, str(root / f"step-{step}"))
    damage_root(root / "step-1", "flipped")
    damage_root(root / "step-3", "newer")
    code, out, _ = cli(capsys, "ls", str(root))
    assert code == 0 and [line.split()[-1] for line in out.splitlines()[1:4]] == ["UNREADABLE", "complete", "UNREADABLE"]
    assert "step 3: its root record does not read" in out and "format version" in out
    code, out, _ = cli(capsys, "gc", str(root), "--keep", "1")
    assert code == 0 and "kept step 1: its root record does not read" in out and "kept step 3" in out
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2", "step-3"]
    code, doc = cli_json(capsys, "gc", str(root), "--keep", "1")
    assert [d["step"] for d in doc["unreadable"]] == [1, 3] and doc["deleted"] == []


def test_diff_reports_values_shapes_dtypes_and_missing_keys(capsys, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = torch.linspace(-1, 1, 50)
    shardstore.save({"same": base, "vals": base, "shape": torch.ones(3), "dtype": torch.ones(3), "only_a": base}, a)
    changed = base.clone()
    changed[7] += 0.5
    shardstore.save({"same": base, "vals": changed, "shape": torch.ones(4), "dtype": torch.ones(3, dtype=torch.float64),
                     "only_b": base}, b)
    code, out, _ = cli(capsys, "diff", a, b)
    assert code == 1
    assert "vals: values differ: max abs 0.5," in out and "shape: shape differs: A [3]" in out
    assert "only_a: only in A" in out and "only_b: only in B" in out and "1 of 6 tensors are the same" in out
    code, doc = cli_json(capsys, "diff", a, b)
    vals = next(t for t in doc["tensors"] if t["key"] == "vals")
    assert vals["max_abs"] == pytest.approx(0.5) and vals["max_rel"] == pytest.approx(0.5 / max(abs(float(base[7])), abs(float(changed[7]))))
    assert cli(capsys, "diff", a, a)[0] == 0


def test_diff_pairs_tensors_by_key_path_where_only_one_side_has_names_that_meet(capsys, tmp_path):
    """A holds ``a.b`` and ``a -> b`` (named ``a.b`` and ``a/b``), B only ``a -> b`` (named ``a.b``): paired
    by name, A's ``a.b`` was compared with B's ``a -> b`` ("values differ") and A's ``a -> b`` was "only in
    A"; the two ``a -> b`` are the same tensor."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardstore.save({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, a)
    shardstore.save({"a": {"b": torch.zeros(2)}}, b)
    code, out, _ = cli(capsys, "diff", a, b)
    assert code == 1 and "a.b: only in A" in out and "values differ" not in out and "1 of 2 tensors are the same" in out, out
    code, out, _ = cli(capsys, "diff", b, a)
    assert code == 1 and "a.b: only in B" in out and "values differ" not in out, out


def test_keys_whose_names_meet_are_each_listed_verified_and_compared(capsys, tmp_path):
    """``a.b``, ``a -> b`` and ``a/b``: the second's fallback name was the third's dotted name, so one
    of them vanished from ``open``, ``verify`` (a damaged one passed) and ``diff`` (a change went unseen)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardstore.save({"a.b": torch.ones(2), "a": {"b": torch.full((2,), 2.0)}, "a/b": torch.full((2,), 3.0)}, a)
    shardstore.save({"a.b": torch.ones(2), "a": {"b": torch.full((2,), 9.0)}, "a/b": torch.full((2,), 3.0)}, b)
    ckpt = shardstore.open(a)
    assert {float(ckpt.read(k)[0]) for k in ckpt.keys()} == {1.0, 2.0, 3.0}
    code, out, _ = cli(capsys, "diff", a, b)
    assert code == 1 and "a/b: values differ" in out and "2 of 3 tensors are the same" in out
    obj = tmp_path / "a" / "a" / "b" / "c.0"
    obj.write_bytes(bytes([obj.read_bytes()[0] ^ 0xFF]) + obj.read_bytes()[1:])
    code, out, _ = cli(capsys, "verify", a)
    assert code == 1 and "BAD a/b chunk" in out


def test_console_script_runs_in_a_subprocess(sharded, tmp_path):
    url = _damaged_copy(sharded, tmp_path)
    done = run_script("verify", url)
    assert done.returncode == 1 and "inner chunk 0 of 'w': crc32c mismatch" in done.stdout, done.stderr
    assert "\r" not in done.stderr  # no progress bar when stdout is not a terminal
    done = run_script("inspect", sharded, "--json")
    assert done.returncode == 0 and '"placements": [\n        "S(0)",\n        "S(1)"' in done.stdout


def test_the_package_declares_the_console_script():
    text = (REPO / "pyproject.toml").read_text()
    assert '[project.scripts]\nshardstore = "shardstore.cli:main"\n' in text
    assert '"tqdm>=' in text.split("[project.optional-dependencies]")[0]  # a runtime dependency


def test_fsspec_urls_and_storage_options(capsys):
    import uuid

    from shardstore.cli.common import key_value

    url = f"memory://cli-{uuid.uuid4().hex}/ck"
    shardstore.save({"w": torch.ones(3, 2)}, url)
    code, out, err = cli(capsys, "verify", url, "--storage-option", "skip_instance_cache=false")
    assert code == 0 and "OK (1 tensors, 1 objects" in out, err
    assert cli_json(capsys, "inspect", url, "-o", "skip_instance_cache=false")[1]["tensors"]["w"]["shape"] == [3, 2]
    assert key_value("anon=true") == ("anon", True) and key_value("endpoint_url=http://127.0.0.1:9") == ("endpoint_url", "http://127.0.0.1:9")
    assert cli(capsys, "inspect", url, "-o", "novalue")[0] == 2  # not KEY=VALUE: a usage error


def test_storage_options_on_a_local_path_are_a_one_line_input_error(capsys, sharded):
    code, _, err = cli(capsys, "verify", sharded, "-o", "anon=true")
    assert code == 2 and "storage_options ['anon'] do not apply to a local path" in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_storage_option_the_filesystem_refuses_is_a_one_line_input_error(capsys):
    pytest.importorskip("s3fs")  # it hands options to its client only at the first request
    code, _, err = cli(capsys, "ls", "s3://bucket/run", "-o", "bogus=1", "-o", "endpoint_url=http://127.0.0.1:1",
                       "-o", "key=k", "-o", "secret=s")
    assert code == 2 and "the s3:// filesystem refused a storage option" in err and "'bogus'" in err
    assert len(err.strip().splitlines()) == 1, err


def test_the_command_follows_an_object_stores_current_version_pointer(capsys, tmp_path):
    """An overwrite on an object store commits through ``.shardstore-current`` (docs/format.md §5); ls,
    inspect, diff and convert read the version it names, as load and verify do."""
    import uuid

    run = f"memory://cli-{uuid.uuid4().hex}/run"
    shardstore.save({"w": torch.ones(4, 4), "step": 1}, f"{run}/step-1")
    shardstore.save({"w": torch.ones(4, 4), "step": 1}, f"{run}/step-2")
    shardstore.save({"w": torch.zeros(4, 4), "step": 2}, f"{run}/step-2", overwrite=True)
    code, doc = cli_json(capsys, "ls", run)
    assert code == 0 and [(d["step"], d["complete"]) for d in doc] == [(1, True), (2, True)]
    code, doc = cli_json(capsys, "inspect", f"{run}/step-2")
    assert code == 0 and doc["tensors"]["w"]["shape"] == [4, 4]
    code, doc = cli_json(capsys, "verify", f"{run}/step-2")
    assert code == 0 and doc["ok"] and doc["url"] == f"{run}/step-2"  # the URL asked about, not its version
    code, out, _ = cli(capsys, "diff", f"{run}/step-1", f"{run}/step-2")
    assert code == 1 and "step: value differs: A 1, B 2" in out
    code, _, err = cli(capsys, "convert", f"{run}/step-2", str(tmp_path / "out.pt"), "--to", "torch")
    assert code == 0, err
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True)["w"], torch.zeros(4, 4))


def test_inspect_verify_and_reshard_of_a_dcp_or_safetensors_directory_say_what_it_is(capsys, tmp_path):
    """Such a directory has no root zarr.json: it was reported as an interrupted save, and verify exited 1
    (a failed check) on a sound checkpoint of another format."""
    shardstore.save({"w": torch.arange(6.0)}, str(tmp_path / "z"))
    for to, kind in (("dcp", "a torch DCP checkpoint"), ("safetensors", "a safetensors checkpoint")):
        assert cli(capsys, "convert", tmp_path / "z", tmp_path / to, "--to", to)[0] == 0
        for argv in (("inspect",), ("verify",), ("reshard", "--mesh", "2", "--placements", "Shard(0)")):
            extra = (tmp_path / "out",) if argv[0] == "reshard" else ()
            code, _, err = cli(capsys, argv[0], tmp_path / to, *extra, *argv[1:])
            assert code == 2 and f"{tmp_path / to} is {kind}" in err and "interrupted" not in err, err


def test_a_run_directory_or_a_directory_of_foreign_files_is_not_called_an_interrupted_save(capsys, tmp_path):
    """Neither has a root zarr.json, and each was reported as a save that was interrupted or still
    running (verify exiting 1, a failed check); a step directory holding an interrupted save and a
    user's note still is one."""
    run = tmp_path / "run"
    for step in (3, 5):
        shardstore.save({"w": torch.ones(2)}, str(run / f"step-{step}"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a checkpoint")
    expected = {run: f"{run} is a run directory of step checkpoints (step-3 to step-5, 2 steps), not a checkpoint: "
                     f"give one step's URL, e.g. {run}/step-5",
                notes: f"{notes} holds no shardstore checkpoint"}
    for url, text in expected.items():
        for argv in (("inspect",), ("verify",), ("reshard", "--mesh", "2", "--placements", "Shard(0)")):
            extra = (tmp_path / "out",) if argv[0] == "reshard" else ()
            code, _, err = cli(capsys, argv[0], url, *extra, *argv[1:])
            assert code == 2 and text in err and "interrupted" not in err, err
        with pytest.raises(shardstore.NotACheckpointError, match="step-5|README.txt"):
            shardstore.load({"w": torch.zeros(2)}, str(url))
    os.remove(run / "step-5" / "zarr.json")
    (run / "step-5" / "NOTE").write_text("mine")
    code, out, _ = cli(capsys, "verify", run / "step-5")
    assert code == 1 and "FAILED: IncompleteCheckpointError" in out and "interrupted" in out, out
    code, _, err = cli(capsys, "verify", run)  # the newest complete step is named
    assert code == 2 and f"e.g. {run}/step-3 (the newest complete one)" in err, err
    parent = tmp_path / "ckpts"  # checkpoints otherwise named, and a user's file
    for name in ("epoch1", "epoch2"):
        shardstore.save({"w": torch.ones(2)}, str(parent / name))
    (parent / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "inspect", parent)
    assert code == 2 and f"{parent} holds checkpoints in sub-directories (epoch1, epoch2)" in err, err
    # A save whose state dict has a key called step-1 makes a node of that name: cut short, it is an
    # interrupted save, not a run.
    half = tmp_path / "half"
    shardstore.save({"step-1": torch.ones(2), "w": torch.ones(2)}, str(half))
    os.remove(half / "zarr.json")
    code, out, _ = cli(capsys, "verify", half)
    assert code == 1 and "FAILED: IncompleteCheckpointError" in out, out
