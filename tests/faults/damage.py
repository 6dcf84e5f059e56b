"""Damage and forge checkpoints as a flipped bit or a hostile hand would, and check that nothing changed.

A fault test saves a small checkpoint (``saved``), damages it (``flip_bit``, ``edit_root``,
``edit_json``, ``forge_index``), then asks ``refused`` for the exact error: the load target must be
untouched and no file under the test's directory may have changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import shardstore
from shardstore import format as fmt
from shardstore.codec import decode_index, index_nbytes
from shardstore.storage import Storage

READERS = ["load", "read"]
STEP = 7
_INDEX = np.dtype("<u8")


def values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.arange(10, dtype=torch.int64)}


def state(tensors: dict[str, torch.Tensor], step: int = STEP) -> dict:
    return {"model": dict(tensors), "layers": [tensors["b"].clone()], "step": step}


def target() -> dict:
    """A load target full of fives and step -1: any byte a failed load wrote into it would show."""
    return state({k: torch.full_like(v, 5) for k, v in values().items()}, step=-1)


def saved(tmp_path: Path, name: str = "ck", **save_options: Any) -> str:
    url = str(tmp_path / name)
    shardstore.save(state(values()), url, **save_options)
    return url


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {os.path.join(d, f): Path(d, f).read_bytes() for d, _, names in os.walk(root) for f in names}


def _tensors(sd: dict) -> list[torch.Tensor]:
    return [*sd["model"].values(), *sd["layers"]]


def refused(reader: str, url: str, error: type, root: Path, key: str = "model.w") -> str:
    """Load (or ``open().read``) from ``url``: ``error`` exactly must be raised, the target stay as it was
    and nothing under ``root`` change. Returns the message."""
    before = files(root)
    sd = target()
    snapshot = [t.clone() for t in _tensors(sd)]
    with pytest.raises(error) as info:
        if reader == "load":
            shardstore.load(sd, url)
        else:
            shardstore.open(url).read(key)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert all(torch.equal(a, b) for a, b in zip(snapshot, _tensors(sd))) and sd["step"] == -1
    assert files(root) == before
    return str(info.value)


def root_file(url: str) -> Path:
    return Path(url) / "zarr.json"


def flip_bit(path: Path, byte: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def edit_json(path: Path, edit: Callable[[dict], Any]) -> None:
    node = json.loads(path.read_text())
    edit(node)
    path.write_text(json.dumps(node, indent=2))


def edit_root(url: str, edit: Callable[[dict], Any], reseal: bool = True) -> None:
    """Hand-edit the root record's block; re-seal its checksum (as a forger would) unless told not to."""
    def change(node: dict) -> None:
        block = node["attributes"]["shardstore"]
        edit(block)
        if reseal:
            block["checksum"] = fmt.root_checksum(block)

    edit_json(root_file(url), change)


def forge_index(url: str, node: str, cell: str, entries: dict[int, tuple[int, int]]) -> Path:
    """Rewrite index entries of one shard object as (offset, nbytes), with a valid crc32c over them."""
    import crc32c

    path = Path(url) / node / cell
    layout = fmt.read_array(Storage(url), node)
    blob = bytearray(path.read_bytes())
    start = len(blob) - index_nbytes(layout)
    pairs = np.frombuffer(bytes(blob[start:-4]), dtype=_INDEX).reshape(-1, 2).copy()
    for i, (offset, nbytes) in entries.items():
        pairs[i] = (offset, nbytes)
    raw = pairs.astype(_INDEX).tobytes()
    blob[start:] = raw + crc32c.crc32c(raw).to_bytes(4, "little")
    path.write_bytes(bytes(blob))
    decode_index(layout, blob[start:], "forged")  # the forgery itself is a well-formed index
    return path
