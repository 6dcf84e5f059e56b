"""What a URL holds where no root record is: a missing root ``zarr.json`` says "a save was interrupted",
which misleads where the URL holds another library's checkpoint, a run directory of step checkpoints
or only a user's files. Each gets an input error that says what it is and what to give instead."""

from __future__ import annotations

from shardstore import format as fmt
from shardstore.commit import foreign_files, is_shardstore_root
from shardstore.errors import CheckpointNotFoundError, NotACheckpointError, ShardstoreError
from shardstore.steps import parse_step, step_name, step_url
from shardstore.storage import Storage

__all__ = ["has_entry", "refuse_other_contents"]

_LOOKED_INTO = 64  # top-level entries checked for a checkpoint of their own (a read each, on object stores a GET)


def has_entry(storage: Storage, key: str) -> bool:
    """Whether anything is named ``key`` at the root: a regular file (``exists``), or a link or other entry
    that a read then refuses, naming it (a directory of links is still told apart from an empty one)."""
    return storage.exists(key) or key in storage.list_names(key)


def refuse_other_contents(storage: Storage, command: str) -> None:
    """Raise an input error when ``storage``, read as a shardstore checkpoint with no root record, is not an
    interrupted save (which the missing record says) but a torch DCP or safetensors checkpoint (naming
    ``command``), a run directory (a ``step-<N>`` entry holding a checkpoint: a save's own node may be
    called so), a directory of checkpoints otherwise named (among its first ``_LOOKED_INTO`` entries: an
    interrupted save of many top-level keys costs that many reads, not one per key), or only files no
    shardstore save writes."""
    url = storage.url
    if storage.exists(fmt.ZARR_JSON):
        return
    kinds = ((".metadata", "a torch DCP checkpoint"), ("model.safetensors.index.json", "a safetensors checkpoint"),
             ("model.safetensors", "a safetensors checkpoint"))
    for key, kind in kinds:
        if has_entry(storage, key):
            also = ", and shardstore.load" if "safetensors" in kind else ""
            raise NotACheckpointError(
                f"{url} is {kind} ({key}), not a shardstore checkpoint: {command} reads shardstore checkpoints only; "
                f"`shardstore convert {url} DST --to zarr` makes one (diff and convert read it as it is{also})")
    names = storage.list_names("")
    steps = sorted(s for s in map(parse_step, names) if s is not None)
    complete = next((s for s in reversed(steps) if _holds_checkpoint(storage, step_name(s))), None)
    if complete is not None:  # not a save's node that happens to be called step-<N>: a step of a run
        held = f"step-{steps[0]}" + (f" to step-{steps[-1]}, {len(steps)} steps" if len(steps) > 1 else "")
        raise NotACheckpointError(
            f"{url} is a run directory of step checkpoints ({held}), not a checkpoint: give one step's URL, e.g. "
            f"{step_url(url, complete)} (the newest complete one); `shardstore ls {url}` lists them")
    others = [n for n in names if parse_step(n) is None]  # the step entries were read above: none holds one
    inner = [n for n in others[:_LOOKED_INTO] if _holds_checkpoint(storage, n)]
    if inner:
        raise NotACheckpointError(
            f"{url} holds checkpoints in sub-directories ({', '.join(inner[:5])}{', ...' if len(inner) > 5 else ''}), "
            f"not a checkpoint itself: give one of their URLs, e.g. {url.rstrip('/')}/{inner[0]}")
    foreign = foreign_files(storage)
    if foreign == [""]:  # an object store lists an object at the URL itself under the empty key
        raise CheckpointNotFoundError(f"no checkpoint at {url}: it is an object, not a prefix holding a checkpoint; check the URL")
    if foreign and len(foreign) == len([k for k in storage.list() if k != fmt.ZARR_JSON]):
        raise NotACheckpointError(
            f"{url} holds no shardstore checkpoint: its files are none that a shardstore save writes (e.g. "
            f"{foreign[:5]}); check the URL")


def _holds_checkpoint(storage: Storage, name: str) -> bool:
    """Whether the entry ``name`` holds a shardstore root record (one read)."""
    try:
        return is_shardstore_root(storage.read(f"{name}/{fmt.ZARR_JSON}"))
    except (ShardstoreError, OSError):
        return False
