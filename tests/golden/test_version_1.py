"""Checkpoints of format version 1 (shard objects at ``c/0/1``, a directory per chunk coordinate) keep
loading, reading and verifying: one is made here from a version 2 checkpoint by moving every object
where version 1 kept it and rewriting the metadata as version 1 wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import shardstore
from shardstore import format as fmt
from shardstore.verify import verify


def _as_version_1(root: Path) -> None:
    for obj in [p for p in root.rglob("c.*") if p.is_file()]:
        dest = obj.parent.joinpath(*obj.name.split("."))
        dest.parent.mkdir(parents=True, exist_ok=True)
        obj.rename(dest)
    for node in root.rglob("zarr.json"):
        text = node.read_text()
        if node.parent == root:
            doc = json.loads(text)
            block = doc["attributes"]["shardstore"]
            block["version"] = 1
            for record in block["tensors"].values():
                del record["chunk_key_separator"]
            block["checksum"] = fmt.root_checksum(block)
            text = json.dumps(doc, indent=2)
        node.write_text(text.replace('"separator": "."', '"separator": "/"'))


def test_a_version_1_checkpoint_loads_opens_and_verifies(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(300, 70, generator=g), "s": torch.tensor(2.5)}, "step": 9}
    url = tmp_path / "ck"
    shardstore.save(state, str(url))
    _as_version_1(url)
    assert (url / "model/w/c/0/0").is_file() and not list(url.rglob("c.*"))

    target = {"model": {"w": torch.zeros(300, 70), "s": torch.tensor(0.0)}, "step": 0}
    shardstore.load(target, str(url))
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["model"]["s"] == 2.5 and target["step"] == 9
    assert torch.equal(shardstore.open(str(url)).read("model.w")[100:200], state["model"]["w"][100:200])
    report = verify(str(url))
    assert report.ok and report.objects == 2, report
