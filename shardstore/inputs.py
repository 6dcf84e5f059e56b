"""Checks on what callers hand to ``save`` and ``load``, run while planning.

A state dict can hold tensors no checkpoint can represent (sparse, nested, quantized or meta tensors,
complex32, sub-byte and packed dtypes), targets no copy can fill correctly (an ``expand()``-ed view whose
elements share memory, two keys sharing elements), and ``user_metadata`` that JSON cannot hold. Found
late, such an entry fails half way: after other ranks wrote their chunks, or after other tensors were
loaded. Found here, in the planning step that every rank agrees on, it fails on every rank with the key
named, before any byte is written and before any tensor changes.

Pure: looks at tensor metadata only (no I/O, no collectives).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from dtensor.api import DTensor
from dtensor.checkpoint import get_tensor_shard
from shardstore.dtypes import DTYPES
from shardstore.errors import UnsupportedInputError
from shardstore.flatten import MAX_DEPTH, KeyPath, fqn, int_too_long
from shardstore.plan import layout_of_value
from shardstore.ties import view_identity

__all__ = ["local_tensor", "check_sources", "check_targets", "check_user_metadata", "snapshot_metadata"]

_STORABLE = frozenset(info.torch_dtype for info in DTYPES)


def local_tensor(key: KeyPath, value: Any) -> torch.Tensor:
    """The tensor this rank holds of a state dict entry (a DTensor's local shard, or the tensor itself),
    detached: the same memory without autograd, since torch's DTensor hands out its shard as the view
    output of an autograd function, which refuses in-place copies into its slices."""
    if isinstance(value, DTensor):
        return get_tensor_shard(value, None).detach()  # its hook, called without DCP's index type (~0.9 s to import)
    if hasattr(type(value), "__get_tensor_shard__"):
        from torch.distributed.checkpoint.metadata import MetadataIndex  # noqa: PLC0415 - on first use: ~0.9 s

        value = value.__get_tensor_shard__(MetadataIndex(fqn(key)))
    return value.detach()


def check_sources(items: Mapping[KeyPath, Any]) -> None:
    """Refuse, naming the key, every tensor of a state dict to save that a checkpoint cannot hold."""
    for key, value in items.items():
        _check_kind(key, value, "saved")


def check_targets(items: Mapping[KeyPath, Any]) -> None:
    """Refuse, naming the key, every tensor of a state dict to load into that a copy cannot fill
    correctly: the kinds a checkpoint cannot hold, and targets whose elements share memory (with
    themselves, or with another target; one tensor under two keys, as tied weights are, is fine)."""
    locals_ = {}
    for key, value in items.items():
        _check_kind(key, value, "loaded into")
        local = local_tensor(key, value)
        if _overlaps_itself(local):
            raise UnsupportedInputError(
                f"state dict entry {fqn(key)!r} is a tensor whose elements share memory (shape {list(local.shape)}, "
                f"strides {list(local.stride())}, e.g. an expand()-ed view): a load cannot give each element its "
                "own value. Load into a tensor of its own (t.clone() or torch.empty(shape)) and assign it back"
            )
        locals_[key] = local
    _check_disjoint(locals_)


def _check_kind(key: KeyPath, value: Any, verb: str) -> None:
    layout_of_value(key, value)  # Partial placements first: such a local tensor is a pending sum, not data
    problem = _unsupported(value) or _unsupported(local_tensor(key, value))
    if problem is None and value.dtype not in _STORABLE:
        problem = (
            f"of dtype {value.dtype}, which has no Zarr data type (complex32, quantized, sub-byte and packed "
            f"dtypes cannot be stored; storable: {sorted(str(d).removeprefix('torch.') for d in _STORABLE)}). "
            "Convert it first (e.g. complex32 -> .to(torch.complex64), a packed dtype -> .view(torch.uint8))"
        )
    if problem is not None:
        raise UnsupportedInputError(f"state dict entry {fqn(key)!r} cannot be {verb}: it is {problem}")


def _unsupported(tensor: Any) -> str | None:
    """Why a tensor's kind has no place in a checkpoint, or None."""
    if getattr(tensor, "is_nested", False):
        return "a nested tensor (ragged, no regular shape). Save its components (t.unbind()) or t.to_padded_tensor(0)"
    if getattr(tensor, "layout", torch.strided) != torch.strided:
        return f"a sparse tensor ({tensor.layout}). Save t.to_dense(), or its indices and values as two tensors"
    if getattr(tensor, "is_quantized", False):
        return "a quantized tensor. Save t.dequantize(), or t.int_repr() with its scale and zero point"
    if getattr(tensor, "is_meta", False):
        return "a meta tensor (shape only, no data). Materialize it first (e.g. module.to_empty(device='cpu'))"
    return None


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: going up the strides, each dim must step past
    everything the smaller ones span (a stride-0 dim of size > 1 never does). Conservative for exotic
    ``as_strided`` interleavings, which are refused though disjoint. A tensor without elements shares
    nothing, whatever its strides (an empty channels_last tensor has a stride 0)."""
    if t.numel() == 0:
        return False
    extent = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def _check_disjoint(tensors: Mapping[KeyPath, torch.Tensor]) -> None:
    """Refuse two targets sharing elements (unless they are one view: tied weights)."""
    spans = sorted((t.device, t.data_ptr(), _end(t), key) for key, t in tensors.items() if t.numel())
    for i, (device, start, stop, key) in enumerate(spans):
        for other_device, other_start, _, other in spans[i + 1 :]:
            if other_device != device or other_start >= stop:
                break
            if view_identity(tensors[key]) == view_identity(tensors[other]) or not _share_elements(tensors[key], tensors[other]):
                continue
            raise UnsupportedInputError(
                f"state dict entries {fqn(key)!r} and {fqn(other)!r} share memory (one views elements of the "
                "other): loading both would leave those elements with whichever value was copied last. Load "
                "into separate tensors, or leave one key out (strict=False) and tie them again after loading"
            )


def _end(t: torch.Tensor) -> int:
    return t.data_ptr() + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly, by marking ``a``'s elements in a mask laid out like their memory; views of different
    element sizes or misaligned starts count as sharing."""
    size = a.element_size()
    base = min(a.data_ptr(), b.data_ptr())
    if b.element_size() != size or (a.data_ptr() - base) % size or (b.data_ptr() - base) % size:
        return True
    mask = torch.zeros(math.ceil((max(_end(a), _end(b)) - base) / size), dtype=torch.bool)
    mask.as_strided(a.shape, a.stride(), (a.data_ptr() - base) // size).fill_(True)
    return bool(mask.as_strided(b.shape, b.stride(), (b.data_ptr() - base) // size).any())


def check_user_metadata(metadata: Any) -> None:
    """Refuse ``user_metadata`` that would not come back equal from JSON (it is stored in the root
    ``zarr.json``): only dicts with str keys, lists, str, int, finite floats, bool and None."""
    if metadata is None:
        return
    problem = _json_problem(metadata, "user_metadata") if isinstance(metadata, dict) else "user_metadata is not a dict"
    if problem:
        raise UnsupportedInputError(
            f"{problem}; user_metadata is stored as JSON in the root zarr.json, so it holds only dicts with str "
            "keys, lists, str, int, finite float, bool and None: convert it (e.g. str(x), a list for a tuple, "
            "a tensor into the state dict) before saving"
        )


def snapshot_metadata(metadata: Any) -> Any:
    """A copy of ``user_metadata``'s dicts and lists (its leaves are immutable where it is valid), so an
    async save stores it as it was at the call however the caller changes it after; nesting deeper than
    ``MAX_DEPTH`` is left as it is, for ``check_user_metadata`` to refuse."""
    def copy(value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            return value
        if isinstance(value, dict):
            return {k: copy(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v, depth + 1) for v in value]
        return value

    return copy(metadata, 0)


def _json_problem(value: Any, where: str, depth: int = 0) -> str | None:
    if depth > MAX_DEPTH:
        return f"{where} is nested more than {MAX_DEPTH} deep (does it hold itself?)"
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            return f"{where} has the key {bad!r} of type {type(bad).__name__}"
        return next((p for k, v in value.items() if (p := _json_problem(v, f"{where}[{k!r}]", depth + 1))), None)
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _json_problem(v, f"{where}[{i}]", depth + 1))), None)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value!r}"
    if int_too_long(value):
        return f"{where} is an int of more than 4300 digits"
    if value is None or isinstance(value, (str, int, float)):
        return None
    return f"{where} is of type {type(value).__name__}"
