"""save and load run with Python's cyclic collector paused (``shardstore.gc_pause``) and leave it as
they found it, also when they fail."""

from __future__ import annotations

import gc

import pytest
import torch

import shardstore


class _Probe:
    """A Stateful value that records whether the collector was on when shardstore called it."""

    def __init__(self) -> None:
        self.seen: list[bool] = []
        self.w = torch.arange(6.0)

    def state_dict(self) -> dict:
        self.seen.append(gc.isenabled())
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.seen.append(gc.isenabled())


@pytest.mark.parametrize("enabled", [True, False])
def test_save_and_load_pause_the_collector_and_restore_it(tmp_path, enabled):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        probe = _Probe()
        shardstore.save({"probe": probe}, str(tmp_path / "ck"))
        shardstore.load({"probe": probe}, str(tmp_path / "ck"))
        assert probe.seen and not any(probe.seen)
        assert gc.isenabled() == enabled
        with pytest.raises(shardstore.CheckpointExistsError):
            shardstore.save({"probe": probe}, str(tmp_path / "ck"))
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()
