"""``save``, ``load`` and ``open``: the data flow of a checkpoint, top to bottom.

save: flatten the state dict, check it is storable -> each rank plans what it holds -> rank 0 merges
      the plans (dedup, balance) and the skeletons (per-rank keys survive) -> rank 0 claims a place to
      write (``commit.begin``) -> every rank writes its cells and its share of the array metadata, and
      syncs them -> all agree -> rank 0 writes and syncs the root ``zarr.json`` (the commit marker) ->
      ``commit.finish`` makes it the checkpoint at the URL, only if no other save committed there
      meanwhile. The phases live in ``saving.py``, shared with ``async_save`` (``async_saver.py``), which
      runs the same phases with the writing and the commit on a background thread.
load: flatten the target state dict, check every target can be filled -> read the root record -> plan
      this rank's reads (validated before any byte moves) -> check every object's shard index -> all
      agree -> read every chunk straight into the targets (or through bounded scratch memory where it
      cannot land unchanged), verifying each as it lands; a checksum failure then raises
      ``PartialLoadError`` on the ranks whose tensors changed. With ``all_or_nothing=True``: read and
      verify every chunk into staging memory first -> all agree -> copy them in.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from shardstore import format as fmt
from shardstore.coordinator import Coordinator
from shardstore.errors import (
    CheckpointChangedError, IncompleteCheckpointError, MissingChunkError, PartialLoadError, ShardstoreError,
)
from shardstore.cell_writer import cells_of
from shardstore.landing import land_runs
from shardstore.object_check import check_runs
from shardstore.placing import place
from shardstore.staged_read import read_checked
from shardstore.gc_pause import gc_paused
from shardstore.flatten import KeyPath, display_names, fill_plain_values, flatten, fqn, is_tensor_like, plain_differences, unflatten
from shardstore.hf import is_safetensors, load_safetensors
from shardstore.other_contents import refuse_other_contents
from shardstore.inputs import check_targets, local_tensor
from shardstore.load_plan import LoadRegion, StoredArray, TargetTensor, check_unexpected_values, load_targets, plan_load
from shardstore.plan import dtype_name
from shardstore.regions import check_read_size, region_box
from shardstore.saving import SaveOptions, SaveResult, plan_save, write_and_commit
from shardstore.stateful import apply_loaded, to_state_dict
from shardstore.storage import Storage
from shardstore.ties import Destinations
from shardstore.workers import spare_core

__all__ = ["save", "load", "open", "Checkpoint", "SaveResult", "LoadResult"]


@dataclass(frozen=True)
class LoadResult:
    """What this rank did during a load; ``missing``/``unexpected`` are filled only with strict=False.

    ``bytes_read``: tensor bytes placed into the state dict; ``bytes_fetched``: bytes read from storage
    (stored chunks with their checksums; more than placed where a chunk is only partly needed).
    ``staged_bytes``: host memory the load held for fetched chunks; ``streamed``: whether chunks were
    copied in as they were verified (the default) rather than all-or-nothing."""

    bytes_read: int
    chunks_read: int
    elapsed_s: float
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    staged_bytes: int
    streamed: bool
    bytes_fetched: int


DEFAULT_STAGING_BYTES = 2 << 30  # per rank: the most an all_or_nothing load may stage
LANDING_SCRATCH_BYTES = 256 << 20  # what a host's loading ranks share for chunks that cannot land in place (``_land``)
LANDING_SCRATCH_MIN = 16 << 20  # the least a rank's share of it is
LANDING_SCRATCH_MAX = 128 << 20  # the most
DEFAULT_MAX_READ_BYTES = 4 << 30  # one Checkpoint.read; bigger regions are read in parts


@gc_paused
def save(
    state_dict: Mapping[str, Any],
    url: str,
    *,
    storage_options: dict | None = None,
    process_group=None,
    overwrite: bool = False,
    compressor: str | None = None,
    user_metadata: dict | None = None,
    durable: bool = True,
    incremental: bool | str = False,
) -> SaveResult:
    """Save a (sharded) state dict as a Zarr v3 checkpoint at ``url``; collective over the group.

    When it returns, the checkpoint is complete, durable (unless ``durable=False``: nothing is fsync'd)
    and the only one at ``url``: of saves racing for one URL at most one succeeds
    (``ConcurrentSaveError`` for the others), and ``overwrite=True`` replaces only a shardstore
    checkpoint, atomically (docs/format.md §5).

    ``incremental``: True records a BLAKE3 digest of every cell's values and layout; the URL of an
    earlier checkpoint saved so also links each object whose cell is unchanged since that checkpoint
    instead of encoding and writing it (docs/format.md §10). Hashing is one pass over the values, so
    the default (False) does not hash."""
    start = time.perf_counter()
    options = SaveOptions(url, storage_options, overwrite, compressor, user_metadata, durable, incremental)
    coord = Coordinator(process_group)
    job = plan_save(coord, state_dict, options.user_metadata)
    stats = write_and_commit(coord, job, options, cells_of(job.plan, job.rank, job.tensors), stable_cells=True)
    return SaveResult.of(url, stats, start)


@gc_paused
def load(
    state_dict: dict,
    url: str,
    *,
    storage_options: dict | None = None,
    process_group=None,
    strict: bool = True,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    all_or_nothing: bool = False,
) -> LoadResult:
    """Fill ``state_dict`` in place from the checkpoint at ``url``, resharding to its layouts. ``url`` may
    also be a Hugging Face safetensors file or directory (``shardstore.hf``).

    Every target the checkpoint fills (``inputs.check_targets``: kind, dtype, memory overlap) and every
    object it reads (present, of its size) are checked first, so an unloadable target or a missing or
    truncated object fails before any tensor changes. Then every chunk is read straight into the memory
    it fills where it can land unchanged (else through at most ``staging_bytes`` of reused scratch
    memory) and its checksum verified as it lands: no staged copy of the rank's share, no second copy.
    An uncompressed object's shard index is read with its last chunks and checked as it lands (one
    read per object, not two). Only damaged bytes (a chunk or an index) can fail that late; a rank
    whose tensors had changed then raises ``PartialLoadError`` naming them, a rank whose state dict is
    unchanged the plain error. ``all_or_nothing=True`` reads and verifies every
    chunk on every rank into staging memory first (each rank's share must fit in its ``staging_bytes``),
    so a failure leaves every state dict unchanged, at the cost of that memory and a second copy.
    Parameters that require grad load (written outside autograd, their version counters bumped).
    """
    start = time.perf_counter()
    coord = Coordinator(process_group)
    # Rank 0 tells what is stored, so every rank takes the same path even where one could not tell (a
    # refused argument, a file only some ranks see): a rank deciding alone raised before any collective
    # while the others waited for it.
    if coord.decide("telling what is stored at the URL", lambda: is_safetensors(url, storage_options)):
        return load_safetensors(state_dict, url, storage_options=storage_options, process_group=process_group, strict=strict)
    storage, (target, items) = coord.agree("reading the state dict",
                                           lambda: (Storage(url, storage_options).pinned(), _flatten_target(state_dict)))
    tensors = {k: v for k, v in items.items() if is_tensor_like(v)}
    wanted = {k for keys in coord.all_gather(tuple(tensors)) for k in keys}  # per-rank keys: wanted somewhere
    job = coord.agree("checking the checkpoint", lambda: _plan_here(target, tensors, storage, strict, wanted, staging_bytes, all_or_nothing))
    # A plain value only the checkpoint has is unexpected where no rank's state dict holds it (every rank
    # judges the same gathered lists alike, so all refuse together, before any tensor changes).
    extras = [set(e) for e in coord.all_gather(job.plain_extra)]
    unexpected_values = tuple(k for k in job.plain_extra if all(k in e for e in extras))
    check_unexpected_values(unexpected_values, strict)
    streamed = not all_or_nothing
    if all_or_nothing:
        _check_staging_fits(coord.all_gather((job.needed, staging_bytes)))
    pieces = None if streamed else coord.agree("reading and verifying chunks", lambda: _read_all(storage, job))
    # Only now, with every rank's chunks verified (all or nothing) or indices checked, does any rank
    # touch its tensors.
    written: dict[str, None] = {}  # names of the tensors this rank has copied into
    try:
        ranks_here = coord.ranks_on_this_host
        staged = coord.agree("copying into the state dict", lambda: _copy_in(target, storage, job, pieces, staging_bytes, written, ranks_here))
    except Exception as exc:
        if not written:
            raise  # this rank's state dict is unchanged: the plain error says why
        raise PartialLoadError(_partly_loaded(exc, written, streamed)) from exc
    coord.agree("handing loaded state to Stateful values", lambda: apply_loaded(state_dict, target))
    return LoadResult(job.nbytes, job.chunks, time.perf_counter() - start, job.missing,
                      job.unexpected + tuple(fqn(k) for k in unexpected_values), staged, streamed, job.needed)


def _flatten_target(state_dict: dict) -> tuple[Mapping[str, Any], dict]:
    """The state dict to fill (Stateful values as their state dicts) and its flattened items."""
    target = to_state_dict(state_dict)
    return target, flatten(target)[0]


@dataclass(frozen=True)
class _LoadJob:
    """What one rank reads: its checked runs, and the numbers it reports."""

    root: fmt.RootMetadata
    checked: list
    layouts: dict
    needed: int  # bytes of the runs it reads
    nbytes: int  # bytes of tensor data it places
    chunks: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    dests: Destinations  # where the chunks go
    plain_extra: tuple[KeyPath, ...]  # the checkpoint's plain values this rank's state dict lacks


def _plan_here(target: Mapping[str, Any], tensors: dict, storage: Storage, strict: bool, wanted: set, staging_bytes: int,
               all_or_nothing: bool) -> _LoadJob:
    """Check this rank's targets (its tensors, and which plain values of ``target`` the checkpoint
    lacks), plan its reads and check every object it reads (no data read yet; a streamed load checks
    most shard indexes as they land, with the data: ``check_runs``)."""
    if not isinstance(staging_bytes, int) or isinstance(staging_bytes, bool) or staging_bytes < 0:
        raise ValueError(f"staging_bytes must be a number of bytes (an int >= 0), got {staging_bytes!r}")
    root = _read_root(storage, "shardstore.load")
    stored, layouts, nodes = _stored_arrays(root)
    check_targets({k: v for k, v in tensors.items() if k in stored})  # the rest is left as it is
    plain_missing, plain_extra = plain_differences(target, root.tree)
    plan = plan_load(load_targets(tensors), stored, strict=strict, wanted=wanted, plain_missing=tuple(plain_missing))
    fmt.check_arrays(storage, [root.tensors[nodes[k]] for k in tensors if k in stored])
    checked = check_runs(storage, plan.runs, layouts, nodes, index_as_it_lands=not all_or_nothing)
    tasks = [task for run in plan.runs for task in run.tasks]
    nbytes = sum(math.prod(t.overlap.sizes) * layouts[t.key].dtype.itemsize for t in tasks)
    needed = sum(c.nbytes for c in checked)
    dests = Destinations.of({k: local_tensor(k, v) for k, v in tensors.items()}, {t.key for t in tasks})
    return _LoadJob(
        root, checked, layouts, needed, nbytes, len(tasks),
        tuple(fqn(k) for k in plan.missing), tuple(fqn(k) for k in plan.unexpected), dests, tuple(plain_extra),
    )


def _check_staging_fits(shares: list[tuple[int, int]]) -> None:
    """For an all-or-nothing load: every rank's share (bytes to fetch) must fit in its staging_bytes."""
    over = {r: (needed, staging) for r, (needed, staging) in enumerate(shares) if needed > staging}
    if over:
        detail = ", ".join(f"rank {r} needs {n} > {s}" for r, (n, s) in over.items())
        raise ValueError(
            f"all_or_nothing=True reads every chunk into staging memory before any tensor changes, but {detail} "
            "bytes of staging_bytes; pass a larger staging_bytes, or load with all_or_nothing=False (straight into "
            "the targets, each chunk verified as it lands)"
        )


def _partly_loaded(exc: Exception, written: dict[str, None], streamed: bool) -> str:
    fix = (
        "Chunks were read straight into the tensors and verified as they landed; load again from an intact "
        "checkpoint, or pass all_or_nothing=True to verify every chunk before any tensor changes."
        if streamed else "Load again (from an intact checkpoint)."
    )
    return (
        f"{exc}\nThis rank had already copied {len(written)} tensor(s) in, so its state dict is now partly loaded: "
        f"{list(written)[:20]}. {fix}"
    )


def _read_all(storage: Storage, job: _LoadJob) -> list:
    """Every verified piece this rank needs; tied targets' pieces are already in their scratch memory and
    checked, so they are left out."""
    pieces, scratch = read_checked(storage, job.checked, job.layouts), job.dests.scratch
    place([p for p in pieces if p[0].key in scratch], job.dests.by_key())
    job.dests.check_ties()
    return [p for p in pieces if p[0].key not in scratch]


def _copy_in(state_dict: dict, storage: Storage, job: _LoadJob, pieces, staging_bytes: int, written,
             ranks_here: int) -> int:
    """Place verified pieces (or stream when ``pieces`` is None, ``ranks_here`` ranks of the load
    running on this host), tied tensors and the saved plain values, noting in ``written`` each tensor
    copied into; returns the staging memory used."""
    if pieces is None:
        staged = _land(storage, job, staging_bytes, written, ranks_here)
        job.dests.check_ties()
    else:
        place(pieces, job.dests.by_key(), written)
        staged = job.needed
    job.dests.write_ties(written)
    fill_plain_values(state_dict, job.root.tree)
    return staged


def _land(storage: Storage, job: _LoadJob, staging_bytes: int, written: dict, ranks_here: int) -> int:
    """Stream the chunks into their targets through at most ``staging_bytes`` of scratch, and at most
    this rank's share of ``LANDING_SCRATCH_BYTES`` with the others on its host (no less than
    ``LANDING_SCRATCH_MIN``, no more than ``LANDING_SCRATCH_MAX``).

    Why a host's share: a process's first load faults its scratch in, and the kernel clears every
    page first; four ranks on two cores spent ~0.25 s of system time each doing so for 128 MiB each,
    a third of their first load (1 GiB on 4 ranks, 8 alternating fresh starts: first load 1.47 s with
    128 MiB a rank against 1.09 s with 32 MiB, later loads 0.88 against 0.93 s); 64 MiB each, between
    the two, measured faster than 32 (below). Why not less: the scratch bounds the reads in flight (a
    batch is half of it), and a cold disk wants several. 2 GiB
    cold in fresh ranks, 3 rounds alternating with the code before (4 loads each): two ranks' first
    load 1.33-1.49 s with 128 MiB each against 1.60-1.73 s with 64 MiB, later loads 1.38-1.46 against
    1.36-1.77 s (medians ~1.40 against ~1.51); four ranks' first 1.72-1.91 s with 64 MiB each against
    1.84-1.94 s with 32 MiB, later ones alike. One rank keeps 128 MiB: 256 measured no faster."""
    try:
        share = max(LANDING_SCRATCH_MIN, min(LANDING_SCRATCH_MAX, LANDING_SCRATCH_BYTES // ranks_here))
        scratch = min(staging_bytes, share)
        return land_runs(storage, job.checked, job.layouts, job.dests.by_key(), scratch, written, spare_core(ranks_here))
    finally:
        for key in job.dests.scratch:  # tied targets were filled into scratch memory only, so far
            written.pop(fqn(key), None)


def _read_root(storage: Storage, command: str) -> fmt.RootMetadata:
    """The root record; where there is none, an input error for a URL that holds no save of ours at all
    (another format, a run directory, a user's files) rather than "a save was interrupted"."""
    try:
        return fmt.read_root(storage)
    except IncompleteCheckpointError:
        refuse_other_contents(storage, command)
        raise


def _stored_arrays(root: fmt.RootMetadata):
    """What the (validated) root record says of each tensor, by key path: planning view, layout, node."""
    stored, layouts, nodes = {}, {}, {}
    keys = root.key_paths()
    for record in root.tensors.values():
        key = keys[record.path]
        layouts[key] = record.layout
        stored[key] = StoredArray(key, record.shape, dtype_name(layouts[key].dtype), record.chunk_shape, record.inner_chunk_shape)
        nodes[key] = record.path
    return stored, layouts, nodes


class Checkpoint:
    """A read-only view of a complete checkpoint; no process group needed.

    The handle plans reads from the root record it read when opened. Should another save later commit at
    its URL, decoding the new bytes with the old record could return wrong values, so every ``read``
    first compares a cheap fingerprint of the root ``zarr.json`` (one stat or HEAD, see
    ``Storage.fingerprint``) and, when that changed, the record's ``commit_id``: another commit, or no
    valid root record at all, raises ``CheckpointChangedError``. The handle refuses rather than re-opens
    so that what ``keys()`` and ``metadata()`` told the caller stays true for its whole life; open the
    URL again to read the new checkpoint. The check is repeated after the bytes are fetched, so a
    replacement racing a read is refused too; where the backend can pin the tree (``Storage.pinned``),
    the bytes of a read in flight are this commit's even while another one is swapped in.
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, max_read_bytes: int = DEFAULT_MAX_READ_BYTES) -> None:
        if not isinstance(max_read_bytes, int) or isinstance(max_read_bytes, bool) or max_read_bytes < 0:
            raise ValueError(f"max_read_bytes must be a number of bytes (an int >= 0), got {max_read_bytes!r}")
        self._at_url = Storage(url, storage_options)  # where another save would commit
        self._max_read_bytes = max_read_bytes
        self._fingerprint = self._root_fingerprint()  # before the record: a commit in between is then noticed
        self._storage = self._at_url.pinned()  # what reads go through
        self._root = _read_root(self._storage, "shardstore.open")
        self._stored, self._layouts, self._nodes = _stored_arrays(self._root)
        self._by_name = display_names(self._stored)
        self._agreeing: set[KeyPath] = set()  # arrays whose zarr.json was found to agree with the root record

    @property
    def url(self) -> str:
        return self._storage.url

    @property
    def commit_id(self) -> str:
        """The id of the save this handle reads (fresh for every save)."""
        return self._root.commit_id

    def keys(self) -> list[str]:
        """Dotted names of the saved tensors (as in error messages and DCP); node paths where dotted
        names would be ambiguous."""
        return list(self._by_name)

    def metadata(self, key: str) -> dict:
        """Shape, dtype and save-time mesh shape and placements of one tensor."""
        record = self._root.tensors[self._nodes[self._key(key)]]
        return {"shape": record.shape, "dtype": record.dtype, "mesh_shape": record.mesh_shape,
                "placements": record.placements, "chunk_shape": record.chunk_shape}

    @property
    def user_metadata(self) -> dict:
        return self._root.user_metadata

    @property
    def tree(self) -> dict:
        """The saved state-dict tree as the root record holds it (``shardstore.flatten``'s skeleton)."""
        return self._root.tree

    def state_dict_skeleton(self):
        """The saved state dict with tensors replaced by their dotted names."""
        return unflatten(self._root.tree, {k: fqn(k) for k in self._stored})

    def read(self, key: str, region: tuple[slice | int, ...] | slice | int | None = None, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole saved tensor, or the part ``region`` selects, as torch indexing would: a tuple of
        slices (step 1) and ints for the leading dims, an int dropping its dim (a list, torch's advanced
        indexing, is refused).

        A region over ``max_read_bytes`` is refused (the message says how to read it in parts), and no
        memory is allocated before the objects' indices show that they hold the bytes it needs. ``out``
        (contiguous, of the region's size and the tensor's dtype) receives the values instead of fresh
        memory: a caller streaming many regions keeps its memory in buffers it controls.
        """
        keypath = self._key(key)
        array, layout = self._stored[keypath], self._layouts[keypath]
        box, shape = region_box(array.shape, region, key)
        check_read_size(key, box, layout.dtype, self._max_read_bytes)
        self._check_unchanged()
        self._check_array(keypath)
        target = TargetTensor(keypath, array.shape, array.dtype, (LoadRegion(box, 0),))
        plan = plan_load({keypath: target}, {keypath: array}, strict=False)
        checked = check_runs(self._storage, plan.runs, self._layouts, self._nodes)
        pieces = read_checked(self._storage, checked, self._layouts)
        self._check_unchanged()
        dest = torch.empty(box.sizes, dtype=layout.dtype) if out is None else _checked_out(key, out, box.sizes, layout.dtype)
        place(pieces, {keypath: [dest]})
        return dest.reshape(shape)

    def _key(self, key: str) -> KeyPath:
        if key not in self._by_name:
            raise KeyError(f"{key!r} is not a tensor of checkpoint {self.url}; it has {self.keys()[:10]}...")
        return self._by_name[key]

    def _check_array(self, keypath: KeyPath) -> None:
        """The array's own zarr.json must agree with the root record (once per array and handle)."""
        if keypath not in self._agreeing:
            fmt.check_arrays(self._storage, [self._root.tensors[self._nodes[keypath]]])
            self._agreeing.add(keypath)

    def _root_fingerprint(self) -> str | None:
        try:
            return self._at_url.pinned().fingerprint(fmt.ZARR_JSON)  # the version now current there
        except (MissingChunkError, NotADirectoryError):  # none, or a file at the URL: read_root says which
            return None

    def _check_unchanged(self) -> None:
        """Refuse to read on when the checkpoint at the URL is no longer the one this handle opened."""
        now = self._root_fingerprint()
        if now == self._fingerprint:
            return
        try:
            commit = fmt.read_root(self._at_url.pinned()).commit_id
        except ShardstoreError as exc:
            raise self._changed(f"its root zarr.json is now unreadable ({type(exc).__name__}: {exc})") from exc
        if commit != self._root.commit_id:
            raise self._changed(f"another save committed there (commit {commit})")
        self._fingerprint = now  # the same commit's record, rewritten or copied

    def _changed(self, what: str) -> CheckpointChangedError:
        return CheckpointChangedError(
            f"checkpoint {self.url} changed after it was opened: {what}; this handle read commit "
            f"{self._root.commit_id}, whose metadata no longer describes the bytes there, so it reads nothing "
            f"more — call shardstore.open({self.url!r}) again to read the checkpoint now at that URL"
        )


def _checked_out(key: str, out: torch.Tensor, sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if out.dtype != dtype or out.numel() != math.prod(sizes) or not out.is_contiguous():
        raise ValueError(f"read({key!r}, out=...): out must be a contiguous {dtype} tensor of {math.prod(sizes)} "
                         f"elements (the region's {list(sizes)}), got {out.dtype} {list(out.shape)}")
    return out.view(sizes)


def open(url: str, storage_options: dict | None = None, *, max_read_bytes: int = DEFAULT_MAX_READ_BYTES) -> Checkpoint:  # noqa: A001 - mirrors zarr.open
    """Open a complete checkpoint for reading (keys, metadata, whole tensors or slices); one ``read`` returns
    at most ``max_read_bytes`` (4 GiB by default)."""
    return Checkpoint(url, storage_options, max_read_bytes=max_read_bytes)
