"""What a URL holds where no root record is: a missing root ``zarr.json`` says "a save was interrupted",
which misleads where the URL holds another library's checkpoint, a run directory of step checkpoints
or only a user's files. Each gets an input error that says what it is and what to give instead."""

from __future__ import annotations

from shardstore import format as fmt
from shardstore.commit import foreign_files
from shardstore.errors import NotACheckpointError
from shardstore.steps import STEP_PREFIX, parse_step, step_url
from shardstore.storage import Storage

__all__ = ["has_entry", "refuse_other_contents"]


def has_entry(storage: Storage, key: str) -> bool:
    """Whether anything is named ``key`` at the root: a regular file (``exists``), or a link or other entry
    that a read then refuses, naming it (a directory of links is still told apart from an empty one)."""
    return storage.exists(key) or key in storage.list_names(key)


def refuse_other_contents(storage: Storage, command: str) -> None:
    """Raise an input error when ``storage``, read as a shardstore checkpoint with no root record, is not an
    interrupted save (which the missing record says) but a torch DCP or safetensors checkpoint, a run
    directory of step checkpoints, or a directory of files no shardstore save writes."""
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
    steps = sorted(s for s in map(parse_step, storage.list_names(STEP_PREFIX)) if s is not None)
    if steps:
        raise NotACheckpointError(
            f"{url} is a run directory holding {len(steps)} step checkpoint(s) (step-{steps[0]} .. step-{steps[-1]}), "
            f"not a checkpoint: {command} reads one step, e.g. {step_url(url, steps[-1])}; `shardstore ls {url}` "
            "lists them and tells which are complete")
    foreign = foreign_files(storage)
    if foreign and len(foreign) == len([k for k in storage.list() if k != fmt.ZARR_JSON]):
        raise NotACheckpointError(
            f"{url} holds no shardstore checkpoint: its files are none that a shardstore save writes (e.g. "
            f"{foreign[:5]}); check the URL")
