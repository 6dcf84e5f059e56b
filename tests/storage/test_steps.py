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


def test_list_steps_of_a_missing_root_is_empty(tmp_path):
    assert list_steps(str(tmp_path / "nothing-here")) == []
