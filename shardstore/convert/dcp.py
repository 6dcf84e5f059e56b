"""torch DCP checkpoint directories (``torch.distributed.checkpoint``), read and written with DCP itself
from one process; a URL of another store goes through a local copy (``localfiles``).

DCP flattens a state dict to dotted names and keeps each one's object path (``planner_data``); it stores
tensors as tensors and every other leaf (a step count, a list of plain values, a tuple) as a pickled
object. Its ``.metadata`` file is a pickle too, which DCP's own reader unpickles with no restriction: it is
read here with an unpickler that imports only DCP's metadata classes, and every data file it names must be
a regular file inside the directory. Reading rebuilds the nesting from those object paths as DCP's own loader does (a str component is
a dict key, an int one a list index) and unpickles the objects with ``weights_only=True`` (DCP's own
planner does not), one tensor at a time: DCP reads whole saved items, so memory is one tensor, and the
last one read is kept for the next region of it. Writing hands DCP the source's tree with meta tensors in
place of tensors and a planner that fetches each tensor only when DCP writes it.

DCP's format itself turns dict keys into strings (``{0: ...}`` reads back as ``{"0": ...}``, as DCP's own
``dcp_to_torch_save`` gives it) and keeps no empty dicts (``convert`` reports them as dropped).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata

from shardstore.convert.localfiles import LocalCopy, local_target
from shardstore.convert.sources import (
    DCP_METADATA, IndexedSource, Region, TensorMeta, TensorSource, apply_region, flatten_loaded, tree_nodes,
)
from shardstore.convert.torchfile import unpickling_problem
from shardstore.errors import CorruptCheckpointError, ShardstoreError, UnsupportedInputError
from shardstore.flatten import fqn, node_children, unflatten
from shardstore.storage.base import check_key

__all__ = ["DcpSource", "write_dcp", "dcp_dropped", "dcp_str_keys"]


@contextmanager
def _one_process():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


@contextmanager
def _unwrapped(url: str, reading: bool):
    """DCP reports any failure as a ``CheckpointException``, a ``BaseException`` whose message is the
    traceback: unwrapped here so the command says what failed in one line. A read that fails (a data file
    missing or cut short) is a damaged checkpoint; a write re-raises what failed (a full disk, a source
    read refused)."""
    try:
        yield
    except CheckpointException as exc:
        inner = next((e for e, _ in exc.failures.values()), None)
        if isinstance(inner, ShardstoreError) or (not reading and isinstance(inner, Exception)):
            raise inner from exc
        if reading and inner is not None:
            what = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
            raise CorruptCheckpointError(f"torch DCP checkpoint {url}: reading its data failed ({what}); a data "
                                         "file is missing, cut short or not DCP's") from exc
        raise


class DcpSource(IndexedSource):
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._copy = LocalCopy(url, storage_options, directory=True)
        metadata = _SafeReader(self._copy.path, url).read_metadata()
        entries = metadata.state_dict_metadata
        paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
        objects = self._load_objects(url, [k for k, m in entries.items() if isinstance(m, BytesStorageMetadata)])
        nested: dict = {}
        self._fqns: dict[int, str] = {}  # id of a meta placeholder -> the DCP name it stands for
        for name, meta in entries.items():
            value = objects.get(name) if not isinstance(meta, TensorStorageMetadata) else self._placeholder(name, meta)
            _set_path(nested, tuple(paths.get(name) or (name,)), value)
        items, tree = flatten_loaded(nested, url, "torch DCP checkpoint")
        self._held = items  # meta placeholders, or tensors that pickled entries held
        super().__init__(url, tree, {key: TensorMeta.of(t) for key, t in items.items()})
        self._last: tuple[str, torch.Tensor] | None = None

    def _placeholder(self, name: str, meta: TensorStorageMetadata) -> torch.Tensor:
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device="meta")
        self._fqns[id(tensor)] = name
        return tensor

    def _load_objects(self, url: str, names: list[str]) -> dict[str, Any]:
        if not names:
            return {}
        planner = _SafeObjectPlanner()
        with _one_process(), _unwrapped(url, reading=True):
            dcp.load(dict.fromkeys(names), storage_reader=_SafeReader(self._copy.path, url), planner=planner)
        for name, exc in planner.refused.items():
            raise UnsupportedInputError(
                f"torch DCP checkpoint {url}: entry {name!r} holds an object torch.load(weights_only=True) refuses "
                f"({unpickling_problem(exc)}); shardstore does not run pickled code. Load it with DCP in trusted "
                "code and save tensors and plain values instead") from exc
        return planner.objects

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        held = self._held[self.key_paths[name]]
        if not held.is_meta:
            return apply_region(held, region).clone()
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous tensor before reading the next
            fqn = self._fqns[id(held)]
            out = {fqn: torch.empty(held.shape, dtype=held.dtype)}
            with _one_process(), _unwrapped(self.url, reading=True):
                dcp.load(out, storage_reader=_SafeReader(self._copy.path, self.url))
            self._last = (name, out[fqn])
        return apply_region(self._last[1], region)


# What a DCP ``.metadata`` pickle imports (module -> names): DCP's metadata dataclasses, torch.Size, a
# layout by name, the path the checkpoint was saved under. Names are matched whole (a dotted name would
# reach through a module's attributes), torch dtypes are checked by type.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file importing nothing but ``_METADATA_GLOBALS`` and torch dtypes:
    a checkpoint from elsewhere must not run code when it is opened."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it imports {module}.{name}, which no DCP metadata holds")


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, but its metadata unpickled by ``_MetadataUnpickler`` and checked: each data file it
    names is a relative path to a regular file inside the directory (no ``..``, no absolute path, no link)."""

    def __init__(self, path: str, url: str) -> None:
        super().__init__(path)
        self._local, self._url = path, url

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        where = f"torch DCP checkpoint {self._url}: its {DCP_METADATA} file"
        try:
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                OverflowError) as exc:
            raise UnsupportedInputError(f"{where} cannot be read as DCP metadata ({exc}); shardstore does not run "
                                        "pickled code. Check that it is a torch DCP checkpoint") from exc
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise CorruptCheckpointError(f"{where} holds {type(metadata).__name__}, not DCP metadata with storage data")
        for info in metadata.storage_data.values():
            self._check_file(getattr(info, "relative_path", None), where)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check_file(self, name: Any, where: str) -> None:
        """``name`` is a data file DCP will open by joining it to the directory: only a relative path to a
        regular file, reached through no link, stays inside."""
        parts = check_key(name, self._url).split("/")
        if any(os.path.islink(os.path.join(self._local, *parts[:i + 1])) for i in range(len(parts))):
            raise UnsupportedInputError(f"{where} names {name!r}, a symbolic link: shardstore reads only the "
                                        "checkpoint's own files and never follows links out of it")
        path = os.path.join(self._local, *parts)
        if os.path.exists(path) and not os.path.isfile(path):
            raise CorruptCheckpointError(f"{where} names {name!r}, which is not a regular file")


class _SafeObjectPlanner(DefaultLoadPlanner):
    """Unpickles DCP's non-tensor entries with ``weights_only=True``: a checkpoint from elsewhere must not
    run code on load (DCP's own planner unpickles them with ``weights_only=False``). Refusals are kept
    for the caller to raise (DCP would wrap them in its own exception)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False)
        self.objects: dict[str, Any] = {}
        self.refused: dict[str, Exception] = {}

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        name = read_item.dest_index.fqn
        try:
            self.objects[name] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            self.refused[name] = exc


def _set_path(root: dict, path: tuple, value: Any) -> None:
    """Put ``value`` at DCP object ``path`` under ``root``, creating a dict under a str component and a
    list under an int one (as DCP's own unflattening does)."""
    node: Any = root
    for part, after in zip(path, path[1:]):
        node = _slot(node, part, {} if isinstance(after, str) else [])
    _slot(node, path[-1], None)
    node[path[-1]] = value


def _slot(node: Any, key: str | int, default: Any) -> Any:
    if isinstance(node, list):
        node.extend([None] * (key + 1 - len(node)))
        if node[key] is None:
            node[key] = default
        return node[key]
    return node.setdefault(key, default)


class _FetchingPlanner(DefaultSavePlanner):
    """Looks each tensor up in the source only when DCP writes it (the state dict holds meta tensors;
    pickled entries holding tensors, such as tuples, get theirs read when DCP pickles them)."""

    def __init__(self, source: TensorSource, names: dict[int, str]) -> None:
        super().__init__()
        self._source, self._names = source, names

    def lookup_object(self, index):
        return self._real(super().lookup_object(index))

    def _real(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and id(value) in self._names:
            return self._source.read(self._names[id(value)])
        if isinstance(value, dict):
            return {k: self._real(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._real(v) for v in value)
        return value


def write_dcp(source: TensorSource, url: str, storage_options: dict | None = None, *, progress=None) -> None:
    """Write ``source`` (its tree: nesting, plain values, tensors) as a DCP checkpoint directory at ``url``."""
    _check_dcp_names(source.tree(), url)
    metas = source.tensors()
    placeholders = {name: torch.empty(m.shape, dtype=m.dtype, device="meta") for name, m in metas.items()}
    state = unflatten(source.tree(), {source.key_paths[name]: t for name, t in placeholders.items()})
    planner = _FetchingPlanner(source, {id(t): name for name, t in placeholders.items()})
    with local_target(url, storage_options, directory=True, last=DCP_METADATA) as path, _one_process(), \
            _unwrapped(url, reading=False):
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=1), planner=planner)
    if progress is not None:
        progress(sum(m.nbytes for m in metas.values()))


def _check_dcp_names(tree: dict, url: str) -> None:
    """Refuse, before anything is written, a tree two of whose leaves DCP would store under one dotted
    name (``{"a.b": x}`` and ``{"a": {"b": y}}`` are both ``a.b`` to DCP, which a shardstore checkpoint
    tells apart)."""
    seen: dict[str, tuple] = {}
    for path, node, _ in tree_nodes(tree):
        if next(iter(node)) in ("dict", "map", "list", "tuple"):
            continue
        other = seen.setdefault(fqn(path), path)
        if other != path:
            raise UnsupportedInputError(
                f"cannot write {url} as torch DCP: the keys {other!r} and {path!r} would both be stored as "
                f"{fqn(path)!r} (DCP names every entry by its dotted path); rename one, or convert to zarr, "
                "safetensors or torch instead")


def dcp_dropped(tree: dict) -> list[str]:
    """Dotted names of the empty dicts in ``tree``: DCP's format keeps no empty dict."""
    return [fqn(path) for path, node, _ in tree_nodes(tree)
            if path and ("dict" in node or "map" in node) and not node_children(node)]


def dcp_str_keys(tree: dict) -> list[str]:
    """Dotted names of the int dict keys in ``tree``: DCP's format stores every dict key as a string."""
    return [fqn(path) for path, _, parent in tree_nodes(tree) if parent == "map" and isinstance(path[-1], int)]
