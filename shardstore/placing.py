"""Placing verified values into a load's destination tensors, as ``load_state_dict`` would.

Both ways of loading (landing chunks as they stream in, ``landing.py``; staging all of them first,
``staged_read.py``) and the tied and Hugging Face paths copy through here, so every write into a
caller's tensor bumps its autograd version counter and respects inference tensors the same way.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dtensor.placements import Box

from shardstore.flatten import KeyPath, fqn
from shardstore.load_plan import ReadTask
from shardstore.memcopy import copy_bytes

__all__ = ["copy_into", "place", "target_region", "count_write"]


def copy_into(dest: torch.Tensor, values: torch.Tensor) -> None:
    """``dest.copy_(values)`` outside autograd, so parameters that require grad load as
    ``load_state_dict`` loads them (their version counter bumped), and inside inference mode for
    inference tensors, which no other mode may write. Between CPU tensors of one dtype the bytes move
    on this thread (``memcopy``)."""
    if copy_bytes(dest, values):
        count_write(dest)
        return
    with torch.inference_mode() if dest.is_inference() else torch.no_grad():
        dest.copy_(values)


def place(
    pieces: list[tuple[ReadTask, torch.Tensor]],
    destinations: Mapping[KeyPath, list[torch.Tensor]],
    written: dict[str, None] | None = None,
) -> None:
    """Copy every verified piece into its destination tensor (one host-to-device copy per piece), noting
    in ``written`` (when given) the name of each tensor as it is first written."""
    for task, values in pieces:
        copy_into(target_region(task, destinations), values)
        if written is not None:
            written.setdefault(fqn(task.key))


def target_region(task: ReadTask, destinations: Mapping[KeyPath, list[torch.Tensor]], box: Box | None = None) -> torch.Tensor:
    """The part of its destination tensor that ``task`` fills, or ``box`` of it (the tensor itself when
    that is all of it, as one chunk fills a small tensor: no indexing)."""
    dest, box = destinations[task.key][task.dest], task.overlap if box is None else box
    return dest if box == task.dest_box else dest[box.relative_to(task.dest_box)]


def count_write(dest: torch.Tensor) -> None:
    """Bump the version counter of memory written behind autograd's back, as ``copy_`` would, so a graph
    that saved the old values refuses to run backward on the new ones (inference tensors have none)."""
    if not dest.is_inference():
        torch.autograd.graph.increment_version(dest)
