"""The only writer and reader of ``zarr.json``: node metadata and the root record.

The contract is ``docs/format.md`` (format version 2; version 1 is read too). Every ``zarr.json`` is produced here as exact
text (pinned by golden tests) and every one read back is parsed by ``shardstore.parse`` (re-exported
here), so a malformed or foreign file becomes a ``CorruptCheckpointError`` naming the file instead of a
``KeyError`` deep in a load.

The root ``zarr.json`` is the commit marker: a save writes it last, and a checkpoint without it is
incomplete. How a finished tree becomes the checkpoint at a URL is ``shardstore/commit.py``.

Nothing read back is trusted before it is checked: the root record carries a checksum of itself and a
fresh ``commit_id`` per save, its tree and tensor table are validated in full (``shardstore.validate``),
and every array ``zarr.json`` a read uses must describe the layout the root record gives
(``check_arrays``), so zarr-python and shardstore can never read different data from one checkpoint.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass, field, fields
from importlib import metadata
from typing import Any

import torch

from shardstore.codec import ArrayLayout
from shardstore.dtypes import dtype_info, dtype_info_by_name
from shardstore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingChunkError,
    UnsafeKeyError,
)
from shardstore.flatten import KeyPath, node_path
from shardstore.parse import (
    BYTES_CODEC,
    CRC32C_CODEC,
    ZSTD_CODEC,
    expect,
    get_field,
    int_list,
    parse_array_json,
    parse_group_json,
)
from shardstore.storage import Storage, check_key
from shardstore.validate import (
    check_sane_grid,
    check_tensors_match_tree,
    root_checksum,
    tree_tensor_keys,
    verify_root_checksum,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ZARR_JSON",
    "RootMetadata",
    "TensorRecord",
    "array_json",
    "check_arrays",
    "chunk_key",
    "group_json",
    "group_paths",
    "is_object_key",
    "node_key",
    "object_key",
    "parse_array_json",
    "parse_group_json",
    "read_array",
    "read_root",
    "root_checksum",
    "write_array",
    "write_group",
    "write_root",
    "is_chunk_key",
]

FORMAT_NAME = "shardstore"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: shard objects at ``c/0/1`` (a directory per chunk coordinate); 2: ``c.0.1``
ZARR_JSON = "zarr.json"
_OBJECT_NAME = re.compile(r"c(\.\d+)*")  # a shard object's name: ``c`` (0-d), ``c.0.1``
_CHUNK_KEY = re.compile(r"c(\.\d+)*|c(/\d+)*")  # relative to its array: ``c.0.1``, or ``c/0/1`` (version 1)


_INLINE = json.JSONEncoder(separators=(", ", ": "), allow_nan=False)  # the C encoder: one line


def _dumps(node: dict[str, Any], where: str, depth: int = 1) -> str:
    """``node`` as JSON text: dicts indented (two spaces) down to ``depth`` levels, all below on one line.

    Why not ``json.dumps(indent=2)``: with an indent, ``json`` leaves its C encoder for a pure-Python
    one, and a number per line made the root record of a 1000-tensor save a tenth of that save's time."""
    try:
        return _text(node, depth, "\n")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: attributes must be plain JSON (str, int, float, bool, None, list, dict "
                        f"with str keys, no NaN/inf): {exc}") from exc


def _text(value: Any, depth: int, newline: str) -> str:
    if depth <= 0 or not isinstance(value, dict) or not value:
        return _INLINE.encode(value)
    inner = newline + "  "
    return "{" + inner + ("," + inner).join(f"{_key(k)}: {_text(v, depth - 1, inner)}" for k, v in value.items()) + newline + "}"


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"keys must be str, not {type(key).__name__} ({key!r})")
    return _INLINE.encode(key)


# -- node JSON -----------------------------------------------------------------------------------------


def group_json(attributes: dict[str, Any] | None = None, depth: int = 1) -> str:
    """Exact ``zarr.json`` text of a group node, its dicts indented down to ``depth`` levels."""
    node = {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}
    return _dumps(node, "group zarr.json", depth)


def array_json(layout: ArrayLayout) -> str:
    """Exact ``zarr.json`` text of an array node (no ``dimension_names``: tensorstore refuses null).

    The shapes are filled into a text rendered once per dtype, compressor and key separator: a save of
    a thousand tensors writes a thousand of these and its load compares as many, and rendering each
    took 56 us, a tenth of that load's own work."""
    template = _array_template(layout.dtype, layout.compressor, layout.chunk_key_separator)
    return template % {name: _int_list(getattr(layout, name)) for name in _SHAPES}


_SHAPES = ("shape", "chunk_shape", "inner_chunk_shape")


def _int_list(values: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, values)) + "]"  # what the C encoder writes for a list of ints


@functools.cache
def _array_template(dtype: torch.dtype, compressor: str | None, separator: str) -> str:
    """``array_json``'s text with a ``%(name)s`` where each of ``_SHAPES`` goes."""
    marks = {name: f"\0{name}" for name in _SHAPES}
    info = dtype_info(dtype)
    codecs = [BYTES_CODEC] + ([ZSTD_CODEC] if compressor == "zstd" else []) + [CRC32C_CODEC]
    node = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": marks["shape"],
        "data_type": info.zarr_name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": marks["chunk_shape"]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": info.fill_value,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": marks["inner_chunk_shape"],
            "codecs": codecs,
            "index_codecs": [BYTES_CODEC, CRC32C_CODEC],
            "index_location": "end",
        }}],
        "attributes": {},
    }
    text = _dumps(node, "array zarr.json").replace("%", "%%")
    for name, mark in marks.items():
        text = text.replace(_INLINE.encode(mark), f"%({name})s")
    return text


def chunk_key(coords: tuple[int, ...], separator: str = ".") -> str:
    """Key of an outer chunk relative to its array node (Zarr's default chunk key encoding): ``c.0.1``,
    ``c`` for a 0-d array. Why ``.`` and not Zarr's usual ``/``: every coordinate but the last would be a
    directory of its own, two more directories per tensor, which were a fifth of a save of a thousand
    small tensors on a local disk; every Zarr v3 reader honours the separator the array declares."""
    return separator.join(["c", *(str(int(c)) for c in coords)])


def object_key(node: str, layout: ArrayLayout, coords: tuple[int, ...]) -> str:
    """Key of the shard object of outer chunk ``coords`` of the array at ``node`` laid out as ``layout``."""
    key = chunk_key(coords, layout.chunk_key_separator)
    return f"{node}/{key}" if node else key


def is_object_key(key: str) -> bool:
    """Whether ``key`` names a shard object (``.../c.0.1``, ``.../c``, or ``.../c/0/1`` in version 1)."""
    parts = key.split("/")
    return parts[-1] != ZARR_JSON and (_OBJECT_NAME.fullmatch(parts[-1]) is not None or "c" in parts[:-1])


def is_chunk_key(key: str) -> bool:
    """Whether ``key``, relative to an array node, names one of its shard objects (``chunk_key``)."""
    return _CHUNK_KEY.fullmatch(key) is not None


def node_key(path: str, name: str = ZARR_JSON) -> str:
    """Key of ``name`` inside node ``path`` (``""`` is the root)."""
    return f"{path}/{name}" if path else name


def group_paths(array_paths: list[str]) -> list[str]:
    """Every group that must exist above the given array nodes (root excluded), parents first."""
    groups = {"/".join(p.split("/")[:i]) for p in array_paths for i in range(1, p.count("/") + 1)}
    return sorted(groups, key=lambda g: (g.count("/"), g))


# -- nodes in storage ----------------------------------------------------------------------------------


def write_group(storage: Storage, path: str, attributes: dict[str, Any] | None = None) -> None:
    storage.write(node_key(path), group_json(attributes).encode())


def write_array(storage: Storage, path: str, layout: ArrayLayout) -> None:
    storage.write(node_key(path), array_json(layout).encode())


def read_array(storage: Storage, path: str) -> ArrayLayout:
    key = node_key(path)
    return parse_array_json(storage.read(key), storage.key_url(key))


def check_arrays(storage: Storage, records: list["TensorRecord"]) -> None:
    """Refuse arrays whose ``zarr.json`` disagrees with the root record; the files are read concurrently
    (a 1000-tensor load must not wait 1000 round trips).

    shardstore plans reads from the root record while zarr-python and tensorstore read each array's own
    ``zarr.json``; were they to differ, the same checkpoint would give different values to each. A file
    holding exactly the text a save writes for the record's layout agrees (comparing the text costs half
    of parsing it); any other is parsed and compared.
    """
    keys = [node_key(r.path) for r in records]
    blobs = storage.read_ranges([(key, 0, None) for key in keys])
    for record, key, blob in zip(records, keys, blobs):
        if blob == array_json(record.layout).encode():
            continue
        layout = parse_array_json(blob, storage.key_url(key))
        if layout != record.layout:
            where = storage.key_url(key)
            raise CorruptCheckpointError(
                f"{where}: describes {_describe(layout)}, but the root zarr.json says {_describe(record.layout)}; "
                "one of the two was damaged or hand-edited, and other Zarr readers would read other values "
                "than shardstore — load an earlier checkpoint or re-run the save"
            )


def _describe(layout: ArrayLayout) -> str:
    return (f"shape {list(layout.shape)} {dtype_info(layout.dtype).zarr_name}, chunks {list(layout.chunk_shape)}, "
            f"inner chunks {list(layout.inner_chunk_shape)}, compressor {layout.compressor}, "
            f"chunk key separator {layout.chunk_key_separator!r}")


# -- the root record -----------------------------------------------------------------------------------


def _shardstore_version() -> str:
    try:
        return metadata.version("shardstore")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class TensorRecord:
    """What the root record says about one saved tensor: where its array is and how it was sharded."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]
    inner_chunk_shape: tuple[int, ...]
    compressor: str | None
    mesh_shape: tuple[int, ...]
    placements: tuple[str, ...]
    chunk_key_separator: str = "."  # absent from version 1 records, whose objects are at ``c/0/1``

    @classmethod
    def from_layout(cls, path: str, layout: ArrayLayout, mesh_shape: tuple[int, ...] = (),
                    placements: tuple[str, ...] = ()) -> "TensorRecord":
        return cls(path, layout.shape, dtype_info(layout.dtype).zarr_name, layout.chunk_shape,
                   layout.inner_chunk_shape, layout.compressor, tuple(mesh_shape), tuple(placements),
                   layout.chunk_key_separator)

    @functools.cached_property
    def layout(self) -> ArrayLayout:
        """Built once: a load asks each record for it several times."""
        info = dtype_info_by_name(self.dtype, f"tensor at {self.path!r}")
        return ArrayLayout(self.shape, info.torch_dtype, self.chunk_shape, self.inner_chunk_shape, self.compressor,
                           self.chunk_key_separator)

    def to_json(self) -> dict[str, Any]:
        values = ((f.name, getattr(self, f.name)) for f in fields(self))  # flat: no deep copy (``asdict``)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values}

    @classmethod
    def from_json(cls, entry: Any, where: str, version: int = FORMAT_VERSION) -> "TensorRecord":
        expect(isinstance(entry, dict), where, "a tensor entry object", entry)
        separator = "/" if version == 1 else get_field(entry, "chunk_key_separator", str, where)
        try:
            record = cls(
                path=get_field(entry, "path", str, where),
                shape=int_list(entry.get("shape"), where, "shape"),
                dtype=get_field(entry, "dtype", str, where),
                chunk_shape=int_list(entry.get("chunk_shape"), where, "chunk_shape"),
                inner_chunk_shape=int_list(entry.get("inner_chunk_shape"), where, "inner_chunk_shape"),
                compressor=entry.get("compressor"),
                mesh_shape=int_list(entry.get("mesh_shape"), where, "mesh_shape"),
                placements=_strings(get_field(entry, "placements", list, where), where, "placements"),
                chunk_key_separator=separator,
            )
            check_sane_grid(record.layout, where)  # also validates dtype, ranks, divisibility, compressor
        except CorruptCheckpointError:
            raise
        except ValueError as exc:
            raise CorruptCheckpointError(f"{where}: inconsistent tensor entry: {exc}") from exc
        return record


@dataclass(frozen=True)
class RootMetadata:
    """The ``shardstore`` block of the root ``zarr.json``: the checkpoint's table of contents."""

    tree: Any
    tensors: dict[str, TensorRecord]
    user_metadata: dict[str, Any] = field(default_factory=dict)
    torch_version: str = torch.__version__
    shardstore_version: str = field(default_factory=_shardstore_version)
    commit_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Fresh per save: tells one commit at a URL from the next (an ``open()`` handle checks it)."""

    def to_json(self) -> dict[str, Any]:
        """The block, sealed with a checksum of itself (so one flipped bit in it is detected)."""
        block = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "commit_id": self.commit_id,
            "tree": self.tree,
            "tensors": {k: t.to_json() for k, t in self.tensors.items()},
            "torch_version": self.torch_version,
            "shardstore_version": self.shardstore_version,
            "user_metadata": self.user_metadata,
        }
        return block | {"checksum": root_checksum(block)}

    def key_paths(self) -> dict[str, KeyPath]:
        """The state-dict key path of every tensor, by node path (the tree keeps the original keys)."""
        return {node_path(key): key for key in tree_tensor_keys(self.tree, "the root record")}

    @classmethod
    def from_json(cls, block: Any, where: str) -> "RootMetadata":
        expect(isinstance(block, dict) and block.get("format") == FORMAT_NAME, where,
                "attributes.shardstore.format 'shardstore' (a shardstore checkpoint)", block)
        version = block.get("version")
        if version not in READABLE_VERSIONS:
            raise CorruptCheckpointError(
                f"{where}: format version {version!r}, this shardstore reads versions {list(READABLE_VERSIONS)}; "
                "upgrade shardstore to load checkpoints written by a newer one (if none wrote it, the file is damaged)"
            )
        verify_root_checksum(block, where)
        tensors = get_field(block, "tensors", dict, where)
        root = cls(
            tree=block.get("tree"),
            tensors={k: _tensor_entry(k, v, f"{where} tensor {k!r}", version) for k, v in tensors.items()},
            user_metadata=get_field(block, "user_metadata", dict, where),
            torch_version=get_field(block, "torch_version", str, where),
            shardstore_version=get_field(block, "shardstore_version", str, where),
            commit_id=_commit_id(block, where),
        )
        check_tensors_match_tree(root.tree, root.tensors, where)
        return root


def _strings(values: list, where: str, what: str) -> tuple[str, ...]:
    expect(all(isinstance(v, str) for v in values), where, f"{what} as a list of strings", values)
    return tuple(values)


def _commit_id(block: dict[str, Any], where: str) -> str:
    value = get_field(block, "commit_id", str, where)
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
        raise CorruptCheckpointError(f"{where}: commit_id {value!r} is not 32 lower-case hex digits; the root "
                                     "zarr.json was damaged or hand-edited — load an earlier checkpoint or re-run the save")
    return value


def _tensor_entry(key: str, entry: Any, where: str, version: int) -> TensorRecord:
    """One entry of ``tensors``; its key and its path name a node reads go to, so both must stay inside."""
    record = TensorRecord.from_json(entry, where, version)
    for name in dict.fromkeys((key, record.path)):
        try:
            check_key(name, where)
        except UnsafeKeyError:
            raise UnsafeKeyError(
                f"{where}: node path {name!r} would leave the checkpoint root; the root zarr.json was damaged "
                "or hand-edited, so nothing is read from it — load an earlier checkpoint or re-run the save"
            ) from None
    return record


def root_json(root: RootMetadata) -> str:
    """Exact text of the root ``zarr.json``: indented down to the entries of the record's fields (one
    line per tensor)."""
    return group_json({FORMAT_NAME: root.to_json()}, depth=4)


def write_root(storage: Storage, root: RootMetadata) -> None:
    """Write the root ``zarr.json``: the commit marker, so call it after every other object is written."""
    storage.write(ZARR_JSON, root_json(root).encode())


def read_root(storage: Storage) -> RootMetadata:
    """Read and validate the root record; tells a missing checkpoint from an interrupted save."""
    try:
        text = storage.read(ZARR_JSON)
    except MissingChunkError:
        if storage.is_empty():
            raise CheckpointNotFoundError(
                f"no checkpoint at {storage.url}: nothing is stored there; check the URL (and "
                "storage_options) or save a checkpoint first"
            ) from None
        raise IncompleteCheckpointError(
            f"checkpoint {storage.url} has no root zarr.json: it is incomplete (a save was interrupted "
            "or is still running); load an earlier checkpoint or re-run the save"
        ) from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(
            f"no checkpoint at {storage.url}: it is a file, not a checkpoint directory (a torch.save or safetensors "
            "file? `shardstore convert` reads both, `shardstore.load` safetensors); check the URL"
        ) from None
    where = storage.key_url(ZARR_JSON)
    attributes = parse_group_json(text, where)
    return RootMetadata.from_json(attributes.get(FORMAT_NAME), where)
