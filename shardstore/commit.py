"""The commit protocol: of writers racing for one URL at most one commits, a checkpoint is never a mix of
two saves, and a crash at any point leaves the old or the new checkpoint loadable at the URL.

A save is ``begin`` (rank 0: look at what the URL holds, refuse what must not be replaced, claim a place
to write), every rank writes there, then ``finish`` (rank 0: make it the checkpoint at the URL, only if
the URL still holds what ``begin`` saw). docs/format.md §5 is the contract.

Where the backend renames whole trees (local filesystems), every save writes into a fresh staging
sibling ``<url>.staging-<id>`` that nobody else writes to, owned through a lock file inside it that
rank 0 holds for the whole save (``flock``: it dies with the process). ``finish`` takes a short lock
(``<url>.lock``), checks it still owns its staging tree and that the URL still holds what ``begin``
saw (nothing, or the same root record), then moves the staging tree in with one atomic rename (onto
nothing or an empty directory) or one atomic exchange with the old tree, which it then deletes.
Object stores cannot rename: a fresh save claims the URL with an exclusively created claim object
(``If-None-Match: *``) and writes in place. An overwrite writes a whole new version under
``<url>/.v-<id>/`` and commits by pointing ``<url>/.shardstore-current`` at it (one PUT, under the
commit lock object): readers resolve the pointer (``Storage.pinned``), so the old checkpoint loads until
that PUT and the new one from then on; the old version is deleted after.

Litter from killed saves never blocks: ``begin`` removes staging siblings whose owner lock is free
(their save is dead), and locks die with their process.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass

from shardstore import format as fmt
from shardstore.errors import CheckpointExistsError, ConcurrentSaveError, MissingChunkError, NotACheckpointError, ShardstoreError
from shardstore.format import FORMAT_NAME, ZARR_JSON, is_chunk_key, is_object_key
from shardstore.commit_lock import commit_lock
from shardstore.digests import DIGESTS
from shardstore.storage import CURRENT, VERSION_PREFIX, HeldLock, Storage

__all__ = ["Claim", "begin", "destination", "finish", "abandon", "sweep", "clear_interrupted", "foreign_files", "is_shardstore_root"]

OWNER = ".shardstore-owner"  # in a staging tree: locked by the saving process (removed before the swap)
CLAIM = ".shardstore-claim"  # object stores: a fresh save's claim on the URL itself
_NAME_MAX = 255  # bytes in one file name on Linux filesystems (ext4, xfs, btrfs, tmpfs)
YOUNG_S = 60.0  # a staging tree without an owner this recent may be one whose owner is being created
# What ``finish`` writes into the pointer: a damaged one that names anything else names nothing to delete.
_VERSION_NAME = re.compile(rf"{re.escape(VERSION_PREFIX)}[0-9a-f]{{16}}")

_owners: dict[str, HeldLock] = {}  # nonce -> the owner lock rank 0 holds until finish/abandon


@dataclass(frozen=True)
class Claim:
    """What ``begin`` decided: where the ranks write, and what the URL must still hold at ``finish``."""

    dest_url: str
    expected: str | None  # token of what was at the URL (None: nothing)
    nonce: str
    staged: bool  # written into a staging sibling (else straight into the URL)


# -- begin ---------------------------------------------------------------------------------------------


def begin(target: Storage, overwrite: bool) -> Claim:
    """Look at ``target``, refuse what must not be replaced, and claim a place for this save to write."""
    nonce = uuid.uuid4().hex[:16]
    expected = _token(target)
    if expected is not None and not overwrite:
        if not target.can_rename_trees and target.exists(CLAIM):
            raise _claimed(target)
        raise CheckpointExistsError(
            f"{target.url} already holds a checkpoint (or an interrupted save); pass overwrite=True (--overwrite "
            "on the command line) to replace it (the old checkpoint stays loadable until the new one is complete), "
            "or save elsewhere"
        )
    if not target.can_rename_trees:
        target.parent()  # where the commit lock goes: a bucket root has no such place, refused up front
        return _claim_on_object_store(target, expected, nonce)
    staging = _staging(target, nonce)
    with commit_lock(target):  # so that no sweep sees the new tree before its owner holds it
        trash = _sweep(target) if target.can_rename_trees else []
        _owners[nonce] = staging.lock(OWNER, timeout=0)
    _delete_trees(target.parent(), trash)
    return Claim(staging.url, expected, nonce, staged=True)


def destination(target: Storage, claim: Claim, storage_options: dict | None, durable: bool = True) -> Storage:
    """Where the ranks write: ``target`` itself, or the tree ``begin`` claimed, which only this save
    writes and nobody reads before ``finish`` (so a ``Storage.private`` view)."""
    if claim.dest_url == target.url:
        return target
    return Storage(claim.dest_url, storage_options, durable=durable).private()


def _claim_on_object_store(target: Storage, expected: str | None, nonce: str) -> Claim:
    """A fresh URL is claimed and written in place; a checkpoint is replaced by a new version under it,
    owned (against ``abandon`` of another save) by an exclusively created owner object."""
    if expected is None:
        _claim_fresh(target, nonce)
        return Claim(target.url, None, nonce, staged=False)
    version = target.child(f"{VERSION_PREFIX}{nonce}")
    _owners[nonce] = version.lock(OWNER, timeout=0)
    return Claim(version.url, expected, nonce, staged=True)


def _staging(target: Storage, nonce: str) -> Storage:
    name = f"{target.name}.staging-{nonce}"
    if len(name.encode(errors="surrogateescape")) > _NAME_MAX:  # else ENAMETOOLONG naming a path the user never gave
        raise ValueError(
            f"{target.url}: the checkpoint's name is {len(target.name.encode(errors='surrogateescape'))} bytes; a save "
            f"writes beside it under the name plus '.staging-<16 hex>' (25 bytes), and file names hold at most "
            f"{_NAME_MAX} bytes, so choose a name of at most {_NAME_MAX - 25} bytes")
    return target.parent().child(name)


def _token(target: Storage) -> str | None:
    """What the URL holds: None when nothing, else a token that changes whenever a save commits there.

    Refuses (even with overwrite) anything that is neither a shardstore checkpoint nor an interrupted
    shardstore save, so an overwrite never deletes other files."""
    if target.is_empty():
        return None
    if not target.can_rename_trees and target.exists(CURRENT):
        _refuse_foreign(target)
        return f"version {target.read(CURRENT).decode(errors='replace')}"
    try:
        root = target.read(ZARR_JSON)
    except MissingChunkError:
        root = None
    except NotADirectoryError:
        raise NotACheckpointError(
            f"{target.url} is a file, not a checkpoint directory; refusing to save there, even with "
            "overwrite=True, since replacing it would delete it. Save to a path of its own"
        ) from None
    _refuse_foreign(target, root_is_foreign=root is not None and not is_shardstore_root(root))
    return "incomplete" if root is None else hashlib.sha256(root).hexdigest()


def is_shardstore_root(text: bytes | bytearray) -> bool:
    try:
        node = json.loads(text)
    except ValueError:
        return b'"shardstore"' in text  # a damaged checkpoint is still ours to replace
    return isinstance(node, dict) and isinstance(node.get("attributes"), dict) and FORMAT_NAME in node["attributes"]


def foreign_files(target: Storage) -> list[str]:
    """The keys under ``target`` that no shardstore checkpoint or save of ours makes, so not ours to
    delete. A checkpoint, or an interrupted save, holds only node ``zarr.json`` files, chunk objects and
    temporaries; anything else (notes, other runs' checkpoints in sub-directories, another library's
    checkpoint) is foreign.

    Where a checkpoint's root record can be read, only the nodes it names count as its own: a name
    alone does not, as another checkpoint or a Zarr array kept in a sub-directory is made of
    ``zarr.json`` files and chunk objects too."""
    records: dict[str, _Nodes | None] = {}

    def recorded(prefix: str) -> "_Nodes | None":
        if prefix not in records:
            records[prefix] = _recorded_nodes(target.child(prefix) if prefix else target)
        return records[prefix]

    return [k for k in target.list() if k != ZARR_JSON and not _looks_like_ours(k, recorded)]


def _refuse_foreign(target: Storage, root_is_foreign: bool = False) -> None:
    """Refuse to replace what holds foreign files (``foreign_files``), or a root ``zarr.json`` not ours."""
    foreign = ([ZARR_JSON] if root_is_foreign else []) + foreign_files(target)
    if foreign:
        raise NotACheckpointError(
            f"{target.url} holds files that are not part of a shardstore checkpoint (e.g. {foreign[:5]}); "
            "refusing to save there, even with overwrite=True, since replacing it would delete them. "
            "Save to a path of its own (e.g. a sub-directory per step)"
        )


@dataclass(frozen=True)
class _Nodes:
    """The array and group nodes a checkpoint's root record names."""

    arrays: frozenset[str]
    groups: frozenset[str]


def _recorded_nodes(checkpoint: Storage) -> _Nodes | None:
    """The nodes of the checkpoint at ``checkpoint`` by its root record; None where that cannot be read
    (none, damaged, of a newer format): its files are then judged by their names."""
    try:
        root = fmt.read_root(checkpoint)
    except (ShardstoreError, OSError):
        return None
    arrays = [record.path for record in root.tensors.values()]
    return _Nodes(frozenset(arrays), frozenset(fmt.group_paths(arrays)))


def _looks_like_ours(key: str, recorded) -> bool:
    """Whether ``key`` is a file a checkpoint or a save of ours makes; ``recorded(prefix)`` gives the
    nodes of the checkpoint at the root (``""``) or at a version's prefix, or None."""
    parts = key.split("/")
    name = parts[-1]
    in_version = parts[0].startswith(VERSION_PREFIX)
    rest = parts[1:] if in_version else parts  # the key inside its checkpoint
    if name in (CLAIM, CURRENT) or ".tmp-" in name or (name == OWNER and len(rest) == 1):
        return True  # OWNER: at the top of a staging tree or a version
    if len(rest) == 1:  # the checkpoint's root, or a version's
        return name in (ZARR_JSON, DIGESTS)
    nodes = recorded(parts[0] if in_version else "")
    if nodes is None:
        return name == ZARR_JSON or is_object_key(key)
    if name == ZARR_JSON:
        node = "/".join(rest[:-1])
        return node in nodes.arrays or node in nodes.groups
    return any("/".join(rest[:i]) in nodes.arrays and is_chunk_key("/".join(rest[i:])) for i in range(len(rest)))


def _claim_fresh(target: Storage, nonce: str) -> None:
    try:
        target.create_exclusive(CLAIM, nonce.encode())
    except FileExistsError:
        raise _claimed(target) from None


def _claimed(target: Storage) -> ConcurrentSaveError:
    return ConcurrentSaveError(
        f"another save is writing to {target.url} ({target.key_url(CLAIM)} exists); wait for it, or, if "
        "no save is running, that one was interrupted: pass overwrite=True (--overwrite on the command line) to replace it"
    )


# -- finish --------------------------------------------------------------------------------------------


def finish(target: Storage, dest: Storage, claim: Claim) -> None:
    """Make the complete checkpoint in ``dest`` the one at ``target``, if ``target`` still holds what
    ``begin`` saw; otherwise raise ``ConcurrentSaveError`` and leave ``target`` as it is."""
    if not claim.staged:
        return _finish_in_place(target, claim)
    owner = _owners[claim.nonce]  # on failure ``abandon`` releases it and removes the tree
    with commit_lock(target):
        if not owner.held():
            raise _taken_over(target, dest.key_url(OWNER))
        _check_unchanged(target, claim)
        owner.release()  # removes the owner file: the tree becomes exactly the checkpoint
        dest.sync()
        _swap_in(target, dest, claim) if target.can_rename_trees else target.write(CURRENT, dest.name.encode())
    del _owners[claim.nonce]
    if not target.can_rename_trees:
        _delete_old_version(target, claim.expected, keep=dest.name)
    elif claim.expected is not None:
        dest.delete_prefix()  # ``dest`` now names the old tree; deleted outside the lock (a sweep may beat us)


def _finish_in_place(target: Storage, claim: Claim) -> None:
    """A fresh save's root marker is written; it has committed if its claim is still its own and no
    overwrite has pointed the URL at a version meanwhile. Checked under the commit lock: an overwrite
    checks the URL and moves the pointer under it, so of the two exactly one sees the other's commit
    (without the lock both could return, the fresh save's checkpoint hidden behind the pointer)."""
    with commit_lock(target):
        try:
            owner = target.read(CLAIM).decode()
        except (MissingChunkError, UnicodeDecodeError):
            owner = None
        if owner != claim.nonce or target.exists(CURRENT):
            raise _taken_over(target, target.key_url(CLAIM))
        target.delete(CLAIM)
    target.sync()


def _taken_over(target: Storage, what: str) -> ConcurrentSaveError:
    return ConcurrentSaveError(
        f"this save's claim {what} was removed or taken over while it was writing (another save to "
        f"{target.url} replaced it); nothing was committed — re-run the save"
    )


def _check_unchanged(target: Storage, claim: Claim) -> None:
    if _token(target) != claim.expected:
        raise ConcurrentSaveError(
            f"another save committed to {target.url} while this one was writing; this save did not commit "
            "and its data was discarded, so the URL holds exactly one writer's checkpoint — re-run the save "
            "(with overwrite=True to replace that checkpoint)"
        )


def _swap_in(target: Storage, dest: Storage, claim: Claim) -> None:
    """Move the staging tree in, then make the move durable. Once moved the save has committed, so a
    failed sync raises saying so, and leaves the old tree (now under the staging name) to the next
    save's sweep rather than to ``abandon``: if the move is lost in a crash, the URL holds it again."""
    if claim.expected is None:
        dest.rename_tree(target)  # onto nothing or an empty directory; never onto a checkpoint
    else:
        dest.rename_tree(target, exchange=True)  # one atomic step: old or new at the URL, never neither
    try:
        dest.sync()
    except OSError as exc:
        del _owners[claim.nonce]
        raise _not_durable(target, claim, exc) from exc


def _not_durable(target: Storage, claim: Claim, exc: OSError) -> OSError:
    before = "nothing" if claim.expected is None else "the checkpoint it replaced"
    return OSError(exc.errno, (
        f"the save committed: the checkpoint at {target.url} is the new one and reads now, but syncing "
        f"{target.parent().url} after moving it there failed ({exc.strerror or exc}), so the commit may not be "
        f"durable: after a crash or power cut {target.url} may hold {before} instead. Check the disk (the "
        "kernel log names the failure), then re-run the save with overwrite=True: a second sync proves "
        "nothing, as a failed write-back is reported once"))


def _delete_old_version(target: Storage, expected: str | None, keep: str) -> None:
    """Object stores, after the pointer moved: delete the replaced version (the one ``begin`` saw), or,
    when that was written in place, every object outside the versions (its marker first)."""
    if expected is not None and expected.startswith("version "):
        old = expected[len("version "):]
        if old != keep and _VERSION_NAME.fullmatch(old):
            target.child(old).delete_prefix()
        return
    target.delete(ZARR_JSON)
    for key in target.list():
        if key != CURRENT and not key.startswith(VERSION_PREFIX):
            target.delete(key)


def abandon(dest: Storage, claim: Claim) -> None:
    """Remove what a failed save wrote (best effort: a later save's ``begin`` sweeps what remains)."""
    owner = _owners.pop(claim.nonce, None)
    try:
        if claim.staged:
            if owner is not None and (owner.held() or not dest.exists(OWNER)):
                dest.delete_prefix()
        else:
            dest.delete(CLAIM)
    except OSError:
        pass
    finally:
        if owner is not None:
            owner.release()


def sweep(target: Storage) -> None:
    """Delete what dead saves to ``target`` left beside it (staging and trash siblings), as the next save's
    ``begin`` would; a live save's staging tree is kept (its owner lock is held). Local filesystems only:
    elsewhere there are no such siblings to judge."""
    if not target.can_rename_trees:
        return
    with commit_lock(target):
        trash = _sweep(target)
    _delete_trees(target.parent(), trash)


def clear_interrupted(target: Storage, lock_wait: float | None = None) -> bool:
    """Delete an interrupted save written in place at ``target`` (objects, no root marker, only files a
    save of ours writes) so the URL can be saved afresh. Returns whether the URL holds a save's claim
    object: that save is kept, as it may still be writing (an object-store claim outlives a killed
    save, so it cannot tell one from a live one); a save there must replace it with ``overwrite=True``
    (a new version, committed only if the claimed save has not committed meanwhile).

    Judged and deleted under the commit lock, which every commit takes, so no save commits at the URL
    between the judgement and the deletion: one that began before finds the URL changed at its commit
    and commits nothing (``ConcurrentSaveError``). ``lock_wait``: as ``commit_lock``'s ``wait``."""
    if target.is_empty():
        return False
    with commit_lock(target, lock_wait):
        if target.exists(ZARR_JSON) or target.exists(CURRENT) or foreign_files(target):
            return False  # a checkpoint, or not ours: a save there refuses it
        if target.exists(CLAIM):
            return True
        target.delete_prefix()
    return False


def _sweep(target: Storage) -> list[str]:
    """Move the staging siblings of dead saves to ``<name>.trash-<id>`` (cheap, under the commit lock, so
    that no ``finish`` is halfway); returns every trash name, for ``_delete_trees``. Dead: a tree whose
    owner lock is free (it dies with its process), a complete tree without an owner (an old tree swapped
    out, or a new one whose ``finish`` was killed before its swap), an ownerless tree over ``YOUNG_S``
    old."""
    parent = target.parent()
    for name in _siblings(parent, target.name, "staging"):
        try:
            if _is_dead(parent.child(name)):
                parent.child(name).rename_tree(parent.child(f"{target.name}.trash-{uuid.uuid4().hex[:16]}"))
        except FileNotFoundError:
            continue  # removed meanwhile by its failed save (``abandon`` deletes without the commit lock)
    return _siblings(parent, target.name, "trash")


def _siblings(parent: Storage, name: str, kind: str) -> list[str]:
    """The ``<name>.<kind>-<id>`` siblings of the commit protocol: exactly the names it makes (16 hex
    digits), so a user's ``ckpt.staging-old`` beside it is never taken for one."""
    pattern = re.compile(rf"{re.escape(name)}\.{kind}-[0-9a-f]{{16}}")
    return [n for n in parent.list_names(f"{name}.{kind}-") if pattern.fullmatch(n)]


def _delete_trees(parent: Storage, names: list[str]) -> None:
    """Delete the trash trees ``names``; one holding a file no save of ours writes was never moved there
    by ``_sweep`` (which moves only trees of ours): a user's directory that merely has such a name, kept."""
    for name in names:
        tree = parent.child(name)
        if not foreign_files(tree):
            tree.delete_prefix()


def _is_dead(staging: Storage) -> bool:
    if foreign_files(staging):
        return False  # it holds files no save of ours writes: not a tree of ours
    if staging.exists(OWNER):
        try:
            staging.lock(OWNER, timeout=0).release()
        except TimeoutError:
            return False  # a live save holds it
        return True
    return staging.exists(ZARR_JSON) or staging.age() > YOUNG_S
