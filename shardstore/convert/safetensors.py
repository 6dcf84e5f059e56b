"""Hugging Face safetensors, read and written through the storage seam (any fsspec URL), tensor by tensor.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8 bytes, then the tensors' raw little-endian bytes, back to back. A sharded
checkpoint is ``model-0000k-of-0000N.safetensors`` files plus ``model.safetensors.index.json``
(``metadata.total_size``, ``weight_map`` {name: file}), as ``transformers`` writes and reads it.

Reading takes byte ranges from the header offsets, so a slice of rows costs only its bytes (the header
is read once per file). Writing streams each file from a generator of row blocks, so memory stays one
block whatever the checkpoint size.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import torch

from dtensor.placements import Box
from shardstore.convert.localfiles import fresh_directory
from shardstore.other_contents import has_entry
from shardstore.convert.sources import (
    SAFETENSORS_FILE, SAFETENSORS_INDEX, IndexedSource, Region, TensorMeta, TensorSource, row_blocks,
    split_url,
)
from shardstore.errors import (
    CheckpointNotFoundError, CorruptCheckpointError, MissingChunkError, UnsafeKeyError, UnsupportedInputError,
)
from shardstore.storage import Storage, check_key
from shardstore.storage.base import is_local_url

__all__ = ["SafetensorsSource", "write_safetensors", "DTYPES", "DEFAULT_MAX_SHARD_BYTES"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "C64": torch.complex64,
}
_CODES = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # transformers' default max_shard_size
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
BLOCK_BYTES = 64 << 20
_MAX_COUNT = (1 << 63) - 1  # the most elements (and bytes) a torch tensor can have


@dataclass(frozen=True)
class _Entry:
    file: str
    meta: TensorMeta
    begin: int  # absolute offset of the tensor's bytes in its file


class SafetensorsSource(IndexedSource):
    """One ``.safetensors`` file, or a directory holding ``model.safetensors`` (first) or a sharded index: tensors
    only, each a top-level key under its name as stored (``model.layers.0.w``)."""

    holds_values = False

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        weight_map: dict[str, str] | None = None
        beside_index = False  # a directory's model.safetensors with an index next to it
        if url.rstrip("/").endswith(".safetensors"):
            parent, name = split_url(_resolved(url))
            self.storage, files = Storage(parent, storage_options), [name]
            if not self.storage.exists(name):
                raise CheckpointNotFoundError(f"no safetensors file at {url}: nothing is stored there (or it is not "
                                              "a regular file); check the path")
        else:  # model.safetensors first, as transformers' from_pretrained looks for it before the index
            self.storage = Storage(url, storage_options)
            beside_index = self.storage.exists(SAFETENSORS_INDEX)
            if beside_index and not has_entry(self.storage, SAFETENSORS_FILE):
                beside_index, weight_map = False, _weight_map(self.storage)
            files = [SAFETENSORS_FILE] if weight_map is None else list(dict.fromkeys(weight_map.values()))
        self.metadata: dict[str, str] = {}
        self.bytes_read = 0  # tensor bytes read so far (headers not counted)
        self._entries: dict[str, _Entry] = {}
        if weight_map is not None:
            _check_files_exist(self.storage, weight_map, url)
        for file in files:
            entries = self._read_header(file)
            if weight_map is not None:
                _check_against_index(entries, file, self._entries, weight_map, self.storage)
            self._entries.update(entries)
        if beside_index:
            _check_index_agrees(self.storage, self._entries)
        tree = {"dict": {name: {"tensor": [name]} for name in self._entries}}
        super().__init__(url, tree, {(name,): e.meta for name, e in self._entries.items()})

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        """Only the bytes of ``region`` are read: one ranged read per contiguous run of it (one in all for
        a range of rows; one per row for a column slice), concurrently."""
        entry = self._entries[name]
        box = _box(entry.meta.shape, region)
        runs = _byte_runs(entry.meta.shape, box, entry.meta.dtype.itemsize)
        out = torch.empty(box.sizes, dtype=entry.meta.dtype)
        if out.numel():
            requests = [(entry.file, entry.begin + start, entry.begin + stop) for start, stop in runs]
            self.storage.read_ranges_into(requests, out.view(-1).view(torch.uint8).numpy())
            self.bytes_read += sum(stop - start for start, stop in runs)
        return out

    def _read_header(self, file: str) -> dict[str, _Entry]:
        where, size = self.storage.key_url(file), _file_size(self.storage, file)
        if size < 8:
            raise CorruptCheckpointError(f"{where}: a file of {size} bytes is too short for a safetensors file (it "
                                         "starts with an 8-byte header length); the file is truncated or not safetensors")
        (length,) = struct.unpack("<Q", self.storage.read_range(file, 0, 8))
        if length > _MAX_HEADER_BYTES:
            raise CorruptCheckpointError(f"{where}: header of {length} bytes (at most {_MAX_HEADER_BYTES}); not a safetensors file")
        if 8 + length > size:
            raise CorruptCheckpointError(f"{where}: a header of {length} bytes runs past the end of the file ({size} "
                                         "bytes); the file is truncated or not safetensors")
        header = _parse_header(bytes(self.storage.read_range(file, 8, 8 + length)), where)
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise CorruptCheckpointError(f"{where}: the safetensors __metadata__ is {metadata!r}, expected an object of strings")
        self.metadata.update(metadata or {})
        entries = {name: _entry(file, where, name, info, 8 + length) for name, info in header.items()}
        _check_spans(entries, where, 8 + length, size)
        return entries


def _parse_header(text: bytes, where: str) -> dict:
    header = _strict_json(text, where, "header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: the safetensors header is a JSON {type(header).__name__}, expected an "
                                     "object of tensor entries; not a safetensors file")
    return header


def _strict_json(text: bytes, where: str, what: str):
    """``text`` as strict JSON, as the safetensors library parses a header: UTF-8 without a BOM, no NaN or
    Infinity, and no key twice in any object. The format forbids duplicate keys, and readers disagree on
    which copy counts (Python's ``json`` keeps the last), so a file could be reviewed as one tensor and
    loaded as another, or an index send a tensor to either of two files: none is guessed."""
    def unique(pairs: list) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                kind = "tensor " if isinstance(value, dict) and "dtype" in value else ""
                raise CorruptCheckpointError(f"{where}: the safetensors {what} names {kind}{key!r} twice (the format "
                                             "forbids duplicate keys); the file is damaged or crafted")
            seen[key] = value
        return seen

    def no_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=unique, parse_constant=no_constant)
    except CorruptCheckpointError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: the safetensors {what} is not JSON ({exc}); not a safetensors {what}") from exc


def _box(shape: tuple[int, ...], region: Region | None) -> Box:
    """The box ``region`` (step-1 slices of leading dims) selects in a tensor of ``shape``."""
    region = tuple(region or ())
    if len(region) > len(shape):
        raise IndexError(f"{len(region)} slices for a tensor of {len(shape)} dims")
    bounds = [r.indices(n)[:2] for r, n in zip(region, shape)] + [(0, n) for n in shape[len(region):]]
    return Box(tuple(a for a, _ in bounds), tuple(max(0, b - a) for a, b in bounds))


def _byte_runs(shape: tuple[int, ...], box: Box, itemsize: int) -> list[tuple[int, int]]:
    """The contiguous byte ranges of ``box`` in a C-order tensor of ``shape``: below the innermost dim the
    box cuts, it covers whole rows, so each run is that dim's span of whole sub-rows."""
    cut = max((d for d in range(len(shape)) if box.sizes[d] != shape[d]), default=0)
    inner = math.prod(shape[cut + 1:]) * itemsize
    strides = [math.prod(shape[d + 1:]) * itemsize for d in range(len(shape))]
    run = box.sizes[cut] * inner if shape else itemsize
    starts = [0]
    for d in range(cut):
        starts = [s + (box.offsets[d] + i) * strides[d] for s in starts for i in range(box.sizes[d])]
    first = box.offsets[cut] * inner if shape else 0
    return [(s + first, s + first + run) for s in starts]


def _entry(file: str, where: str, name: str, info: dict, data_start: int) -> _Entry:
    try:
        meta = TensorMeta(_counts(info["shape"]), DTYPES[info["dtype"]])
        begin, end = _counts(info["data_offsets"], 2)
        if any(n > _MAX_COUNT for n in itertools.accumulate(meta.shape, operator.mul)):  # as the library, which
            raise ValueError(f"the dims of {list(meta.shape)} multiply past {_MAX_COUNT}")  # also refuses [2**62, 2**62, 0]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has a malformed or unsupported header entry {info!r} "
                                     "(shape and data_offsets are lists of ints >= 0 whose product fits in 63 bits; "
                                     f"supported dtypes {sorted(DTYPES)})") from exc
    if end - begin != meta.nbytes:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} spans {end - begin} bytes, its shape and dtype need {meta.nbytes}")
    return _Entry(file, meta, data_start + begin)


def _check_spans(entries: dict[str, _Entry], where: str, data_start: int, file_size: int) -> None:
    """The tensors' bytes tile the data section exactly, as the safetensors library requires: every span
    inside the file (a header pointing past the end would otherwise be planned as a tensor of any size
    before the first read came up short), none overlapping another, and no byte left to no tensor (a
    shifted offset would read the wrong bytes; data no tensor names is hidden in the file). Offsets are
    named as the header gives them (from the end of the header)."""
    data_size = file_size - data_start
    spans = sorted((e.begin - data_start, e.begin - data_start + e.meta.nbytes, name) for name, e in entries.items())
    for begin, end, name in spans:
        if end > data_size:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} spans bytes [{begin}, {end}) of a data section of "
                                         f"{data_size} bytes; the file is truncated or its header is wrong")
    covered, last = 0, None
    for begin, end, name in spans + [(data_size, data_size, None)]:  # the end of the file closes the last gap
        if begin < covered:
            what = f"tensor {name!r} spans bytes [{begin}, {end}) inside {last!r}" if begin == end else \
                f"tensors {last!r} and {name!r} overlap in the file"
            raise CorruptCheckpointError(f"{where}: {what} (a safetensors header gives each tensor its own bytes, back "
                                         "to back); the header is wrong")
        if begin > covered:
            raise CorruptCheckpointError(f"{where}: bytes [{covered}, {begin}) of the data section belong to no tensor "
                                         "(safetensors tensors lie back to back); the header is wrong or the file altered")
        covered, last = end, name


def _counts(values, length: int | None = None) -> tuple[int, ...]:
    """``values`` as a tuple of ints >= 0 (of ``length`` of them, where given); else ValueError."""
    if not isinstance(values, list) or (length is not None and len(values) != length):
        raise ValueError(f"expected a list of {length or 'any number of'} ints, got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"expected ints >= 0, got {values!r}")
    return tuple(values)


def _weight_map(storage: Storage) -> dict[str, str]:
    """The index's ``weight_map`` ({tensor name: file name}), refused naming the index unless it is one."""
    where = storage.key_url(SAFETENSORS_INDEX)
    index = _strict_json(bytes(storage.read(SAFETENSORS_INDEX)), where, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{where}: no 'weight_map' object; not a safetensors index")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CorruptCheckpointError(f"{where}: the 'weight_map' maps tensor {name!r} to {file!r}, expected a file name")
        try:
            check_key(file, storage.url)
        except UnsafeKeyError:
            raise UnsafeKeyError(f"{where} maps tensor {name!r} to {file!r}: a file outside the directory (or not a "
                                 "relative path); expected a file name in it, such as 'model-00001-of-00002.safetensors'. "
                                 "The index is damaged or crafted") from None
    return weight_map


def _resolved(url: str) -> str:
    """A local file URL with its links resolved: the file a user names is theirs to link, as a symlinked
    checkpoint root is (``hf_hub_download`` returns a link into the cache's blobs). Links inside a
    directory are never followed (``_file_size``)."""
    return os.path.realpath(url.removeprefix("file://")) if is_local_url(url) else url


def _file_size(storage: Storage, file: str) -> int:
    """The size of ``file``, refused where it is a link or not a regular file, saying what to load instead."""
    try:
        return storage.size(file)
    except MissingChunkError:
        raise
    except CorruptCheckpointError as exc:
        what = str(exc).split(" where a regular file")[0]  # '<url> is a symbolic link' (or a FIFO, a directory)
        raise CorruptCheckpointError(
            f"{what}: files of a safetensors directory are read only as regular files in it, never through a link "
            "that could lead out of it (a Hugging Face cache snapshot links each file to its blobs); load the "
            f"{SAFETENSORS_FILE} file itself (a file you name may be a link), or download with local_dir= to get "
            "real files") from None


def _check_files_exist(storage: Storage, weight_map: dict[str, str], url: str) -> None:
    """Every file the index names is there, checked before any header is read: a missing shard is named
    as such, not as a copy of its tensors found in another file."""
    first_tensor: dict[str, str] = {}
    for name, file in weight_map.items():
        first_tensor.setdefault(file, name)
    for file, name in first_tensor.items():  # one size check per file (a request each on an object store)
        try:
            _file_size(storage, file)
        except MissingChunkError:
            raise MissingChunkError(f"{storage.key_url(SAFETENSORS_INDEX)} maps tensor {name!r} to {file}, which does "
                                    f"not exist in {url}; the download is incomplete or the index is wrong") from None


def _check_against_index(entries: dict[str, _Entry], file: str, earlier: dict[str, _Entry], weight_map: dict[str, str],
                         storage: Storage) -> None:
    """The index and the headers of the files it names agree: every tensor it maps to ``file`` is there, and
    no tensor of ``file`` is one it maps to another file or one an earlier file holds too (which copy is
    meant cannot be told, so none is guessed)."""
    where = storage.key_url(SAFETENSORS_INDEX)
    for name, mapped in weight_map.items():
        if mapped == file and name not in entries:
            raise CorruptCheckpointError(f"{where} maps tensor {name!r} to {file}, whose header has no such tensor")
    for name in entries:
        if name in earlier or weight_map.get(name, file) != file:
            other = earlier[name].file if name in earlier else weight_map[name]
            raise CorruptCheckpointError(f"{where}: tensor {name!r} is in both {other} and {file}; the index and the "
                                         "files it names disagree")


def _check_index_agrees(storage: Storage, entries: dict[str, _Entry]) -> None:
    """A directory holding both ``model.safetensors`` and an index loads the file (as transformers does),
    but only where the index names the same tensors: otherwise one of them is stale (or they are two
    models) and which one is meant cannot be told, so neither is guessed."""
    indexed = set(_weight_map(storage))
    differ = sorted(indexed.symmetric_difference(entries))
    if differ:
        raise CorruptCheckpointError(
            f"{storage.url} holds both {SAFETENSORS_FILE} and {SAFETENSORS_INDEX}, and they disagree on which tensors "
            f"exist ({len(differ)} in only one, e.g. {differ[:5]}); transformers would load {SAFETENSORS_FILE}. Remove "
            f"the one that is stale, or load {storage.key_url(SAFETENSORS_FILE)} itself")


def write_safetensors(
    source: TensorSource, url: str, storage_options: dict | None = None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None, progress=None,
) -> list[str]:
    """Write every tensor of ``source`` as safetensors at ``url``: one file when ``url`` ends with
    ``.safetensors``; else a directory with ``model.safetensors``, or shards of at most ``max_shard_bytes``
    and an index when the tensors do not fit in one. Returns the files written."""
    tensors = source.tensors()
    for name, m in tensors.items():
        _code(name, m.dtype)  # every dtype refused before any file is written
    meta = {"format": "pt", **(metadata or {})}
    if url.rstrip("/").endswith(".safetensors"):
        parent, name = split_url(url)
        Storage(parent, storage_options).write_parts(name, _parts(source, tensors, list(tensors), meta, progress))
        return [url]
    groups = _shard_groups(tensors, max_shard_bytes)
    names = [SAFETENSORS_FILE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    with fresh_directory(url, storage_options) as target:
        storage = Storage(target, storage_options)
        for name, group in zip(names, groups):
            storage.write_parts(name, _parts(source, tensors, group, meta, progress))
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": {t: name for name, group in zip(names, groups) for t in group}}
            storage.write(SAFETENSORS_INDEX, json.dumps(index, indent=2).encode())
    return [Storage(url, storage_options).key_url(n) for n in names]


def _shard_groups(tensors: dict[str, TensorMeta], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, meta in tensors.items():
        if groups[-1] and size + meta.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += meta.nbytes
    return groups


def header_bytes(tensors: dict[str, TensorMeta], names: list[str], metadata: dict[str, str]) -> bytes:
    """The length prefix and space-padded JSON header of a file holding ``names`` in that order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        meta = tensors[name]
        header[name] = {"dtype": _code(name, meta.dtype), "shape": list(meta.shape), "data_offsets": [offset, offset + meta.nbytes]}
        offset += meta.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def _code(name: str, dtype: torch.dtype) -> str:
    if dtype not in _CODES:
        raise UnsupportedInputError(f"tensor {name!r} is {dtype}, which safetensors cannot hold (it holds "
                                    f"{sorted(DTYPES)}); convert to zarr, dcp or torch instead")
    return _CODES[dtype]


def _parts(source: TensorSource, tensors: dict[str, TensorMeta], names: list[str], metadata: dict, progress) -> Iterator:
    yield header_bytes(tensors, names, metadata)
    for name in names:
        for rows in row_blocks(tensors[name], BLOCK_BYTES):
            block = source.read(name, None if rows is None else (rows,))
            yield block.contiguous().reshape(-1).view(torch.uint8).numpy()
            if progress is not None:
                progress(block.numel() * block.element_size())
