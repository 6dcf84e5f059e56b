"""``shardstore.load`` from a Hugging Face safetensors checkpoint (one file, or a directory with
``model.safetensors`` or shards and ``model.safetensors.index.json``): a model from the Hub loads straight
into DTensors on any mesh, no conversion step.

Each rank reads only its slices, with ranged reads at the offsets the safetensors headers give (one per
contiguous run of a shard: one for a row shard, one per row for a column shard), then copies them in.
Keys are matched by dotted name (``model.layers.0.self_attn.q_proj.weight``), shapes and dtypes must match,
checked across ranks as a zarr load checks them.
safetensors has no checksums, so what is read is trusted as the file holds it; every rank reads all of its
slices before any rank copies anything (all or nothing, as ``load`` within ``staging_bytes``).
"""

from __future__ import annotations

import time

from shardstore.convert.safetensors import SafetensorsSource
from shardstore.convert.sources import SAFETENSORS_FILE, SAFETENSORS_INDEX
from shardstore.other_contents import has_entry
from shardstore.coordinator import Coordinator
from shardstore.errors import UnsupportedInputError
from shardstore.placing import copy_into
from shardstore.flatten import flatten, fqn, is_tensor_like
from shardstore.format import ZARR_JSON
from shardstore.inputs import check_targets, local_tensor
from shardstore.load_plan import StoredArray, load_targets, match_keys
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
    # Inside an agreed step: a state dict or file refused on one rank fails every rank, none left waiting.
    source, tensors = coord.agree("reading the state dict and the safetensors header",
                                  lambda: (SafetensorsSource(url, storage_options), _tensors(state_dict)))
    wanted = {(fqn(k),) for keys in coord.all_gather(tuple(tensors)) for k in keys}  # per-rank keys: wanted somewhere
    plan, missing, unexpected = coord.agree("checking the state dict against the safetensors",
                                            lambda: _plan(tensors, source, strict, wanted))
    pieces = coord.agree("reading safetensors slices", lambda: [(dest, source.read(name, region)) for dest, name, region in plan])
    coord.agree("copying into the state dict", lambda: _copy_all(pieces))
    return LoadResult(bytes_read=source.bytes_read, chunks_read=len(plan), elapsed_s=time.perf_counter() - start,
                      missing=tuple(map(fqn, missing)), unexpected=tuple(map(fqn, unexpected)),
                      staged_bytes=source.bytes_read, streamed=False, bytes_fetched=source.bytes_read)


def _tensors(state_dict: dict) -> dict:
    return {k: v for k, v in flatten(state_dict)[0].items() if is_tensor_like(v)}


def _copy_all(pieces: list) -> None:
    for dest, values in pieces:
        copy_into(dest, values)


def _plan(tensors: dict, source: SafetensorsSource, strict: bool, wanted: set) -> tuple[list, tuple, tuple]:
    """(destination view, name, region) for every slice this rank reads, and its missing and unexpected
    names; mismatches are refused first by the rule a zarr load applies (``match_keys``), each tensor keyed
    by its dotted name, a safetensors tensor being one chunk of its whole shape."""
    stored = {(name,): StoredArray((name,), m.shape, dtype_name(m.dtype), m.shape, m.shape) for name, m in source.tensors().items()}
    by_name = {fqn(k): k for k in tensors}
    targets = load_targets(tensors)
    missing, unexpected = match_keys({(n,): targets[k] for n, k in by_name.items()}, stored, strict=strict, wanted=wanted)
    check_targets({k: tensors[k] for n, k in by_name.items() if (n,) in stored})
    plan = []
    for name, key in by_name.items():
        target = targets[key]
        if (name,) not in stored or not target.regions:
            continue  # not saved, an empty shard (torch.chunk gives the last ranks none) or a rank outside the mesh
        if len(target.regions) != 1:
            raise UnsupportedInputError(f"{name!r}: a target holding {len(target.regions)} pieces on one rank cannot "
                                        "load from safetensors; convert the checkpoint to zarr and load that")
        box = target.regions[0].box
        dest = local_tensor(key, tensors[key]).view(box.sizes)
        plan.append((dest, name, tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))))
    return plan, missing, unexpected
