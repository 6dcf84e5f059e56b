"""``shardstore.load`` from a Hugging Face safetensors checkpoint (one file, or a directory with
``model.safetensors`` or shards and ``model.safetensors.index.json``): a model from the Hub loads straight
into DTensors on any mesh, no conversion step.

Each rank reads only its slices, with ranged reads at the offsets the safetensors headers give (one per
contiguous run of a shard: one for a row shard, one per row for a column shard), then copies them in.
Keys are matched by dotted name (``model.layers.0.self_attn.q_proj.weight``), shapes and dtypes must match.
safetensors has no checksums, so what is read is trusted as the file holds it; every rank reads all of its
slices before any rank copies anything (all or nothing, as ``load`` within ``staging_bytes``).
"""

from __future__ import annotations

import time

from shardstore.convert.safetensors import SafetensorsSource
from shardstore.convert.sources import SAFETENSORS_FILE, SAFETENSORS_INDEX, has_entry
from shardstore.coordinator import Coordinator
from shardstore.errors import StateDictMismatchError, UnsupportedInputError
from shardstore.placing import copy_into
from shardstore.flatten import flatten, fqn, is_tensor_like
from shardstore.format import ZARR_JSON
from shardstore.inputs import check_targets, local_tensor
from shardstore.load_plan import load_targets
from shardstore.plan import dtype_name
from shardstore.storage import Storage

__all__ = ["is_safetensors", "load_safetensors"]


def is_safetensors(url: str, storage_options: dict | None = None) -> bool:
    """A ``*.safetensors`` URL, or a directory holding a safetensors index or ``model.safetensors``; never
    a shardstore checkpoint (a directory with a root ``zarr.json``), whatever its name."""
    here = Storage(url, storage_options)
    if here.exists(ZARR_JSON):
        return False  # a shardstore checkpoint, whatever its name
    return url.rstrip("/").endswith(".safetensors") or has_entry(here, SAFETENSORS_INDEX) or has_entry(here, SAFETENSORS_FILE)


def load_safetensors(state_dict: dict, url: str, *, storage_options: dict | None = None, process_group=None,
                     strict: bool = True):
    """Fill ``state_dict`` in place from the safetensors checkpoint at ``url``; collective over the group."""
    from shardstore.api import LoadResult  # noqa: PLC0415 - api hooks this module in

    start = time.perf_counter()
    coord = Coordinator(process_group)
    source = SafetensorsSource(url, storage_options)
    tensors = {k: v for k, v in flatten(state_dict)[0].items() if is_tensor_like(v)}
    plan = coord.agree("checking the state dict against the safetensors", lambda: _plan(tensors, source, strict, url))
    pieces = coord.agree("reading safetensors slices", lambda: [(dest, source.read(name, region)) for dest, name, region in plan])
    coord.agree("copying into the state dict", lambda: _copy_all(pieces))
    missing = tuple(n for n in map(fqn, tensors) if n not in source.tensors())
    unexpected = tuple(n for n in source.tensors() if n not in set(map(fqn, tensors)))
    return LoadResult(bytes_read=source.bytes_read, chunks_read=len(plan), elapsed_s=time.perf_counter() - start,
                      missing=missing, unexpected=unexpected, staged_bytes=source.bytes_read, streamed=False,
                      bytes_fetched=source.bytes_read)


def _copy_all(pieces: list) -> None:
    for dest, values in pieces:
        copy_into(dest, values)


def _plan(tensors: dict, source: SafetensorsSource, strict: bool, url: str) -> list:
    """(destination view, name, region) for every slice this rank reads; mismatches refused first."""
    stored = source.tensors()
    by_name = {fqn(k): k for k in tensors}
    _check_match(by_name, tensors, stored, strict, url)
    check_targets({k: tensors[k] for n, k in by_name.items() if n in stored})
    plan = []
    for name, key in by_name.items():
        if name not in stored:
            continue
        target = load_targets({key: tensors[key]})[key]
        if not target.regions:
            continue  # an empty shard (torch.chunk gives the last ranks none) or a rank outside the mesh
        if len(target.regions) != 1:
            raise UnsupportedInputError(f"{name!r}: a target holding {len(target.regions)} pieces on one rank cannot "
                                        "load from safetensors; convert the checkpoint to zarr and load that")
        box = target.regions[0].box
        dest = local_tensor(key, tensors[key]).view(box.sizes)
        plan.append((dest, name, tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))))
    return plan


def _check_match(by_name: dict, tensors: dict, stored: dict, strict: bool, url: str) -> None:
    problems = []
    for name, key in by_name.items():
        meta, value = stored.get(name), tensors[key]
        if meta is None:
            problems += [f"{name!r} is not in the checkpoint"] if strict else []
        elif tuple(value.shape) != meta.shape or value.dtype != meta.dtype:
            problems.append(f"{name!r}: checkpoint {dtype_name(meta.dtype)}{list(meta.shape)}, state dict "
                            f"{dtype_name(value.dtype)}{list(value.shape)}")
    if strict:
        problems += [f"{n!r} is in the checkpoint but not in the state dict" for n in stored if n not in by_name]
    if problems:
        raise StateDictMismatchError(f"the state dict does not match safetensors checkpoint {url}: {'; '.join(problems[:20])}. "
                                     "Fix the keys, shapes or dtypes, or pass strict=False to skip missing and extra keys")
