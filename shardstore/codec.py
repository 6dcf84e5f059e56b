"""Hot-path encoder/decoder of Zarr v3 ``sharding_indexed`` shard objects.

zarr-python's own array I/O is 3-5x too slow for checkpoints, so shard objects are made here by hand,
byte for byte what zarr-python 3.1 and tensorstore read (see ``docs/format.md``). One shard object is
one outer chunk of an array's regular chunk grid:

    [inner chunk 0][crc32c] [inner chunk 1][crc32c] ... [index][crc32c]

Inner chunks are in C order of the inner grid; each is the inner chunk's full-shape little-endian bytes
(zero-padded where it sticks out of the array), optionally zstd-compressed, then the 4-byte
little-endian crc32c of those (stored) bytes. The index, at the end, holds one little-endian uint64
pair (offset, nbytes) per inner chunk in C order, ``nbytes`` counting the 4 crc bytes; inner chunks
lying wholly outside the array are not stored and get (2^64-1, 2^64-1), read as the fill value.

Without compression every stored inner chunk has the same size, so byte ranges follow from the layout
alone and a reader can fetch a single inner chunk without reading the index first.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import crc32c
import numpy as np
import torch

from dtensor.placements import Box
from shardstore.dtypes import DTypeInfo, dtype_info
from shardstore.errors import CorruptCheckpointError
from shardstore.memcopy import as_bytes, copy_bytes

__all__ = [
    "ArrayLayout",
    "ByteRange",
    "CHUNK_KEY_SEPARATORS",
    "COMPRESSORS",
    "check_crc",
    "ZSTD_LEVEL",
    "check_index_bounds",
    "decode_index",
    "decode_inner_chunk",
    "inner_chunk_tensor",
    "inner_chunk_values",
    "encode_shard",
    "shard_parts",
    "index_nbytes",
    "inner_chunk_ranges",
]

COMPRESSORS = (None, "zstd")
CHUNK_KEY_SEPARATORS = (".", "/")  # Zarr v3 default chunk key encoding: ``c.0.1`` or ``c/0/1``
ZSTD_LEVEL = 3
CRC_NBYTES = 4
_MISSING = 2**64 - 1
_ZSTD_MAX_RATIO = 32768  # a zstd block decodes to at most 128 KiB and takes at least 4 bytes
_INDEX_DTYPE = np.dtype("<u8")
BytesLike = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ArrayLayout:
    """How one array is cut: a regular grid of outer chunks (one object each) of inner chunks."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunk_shape: tuple[int, ...]
    inner_chunk_shape: tuple[int, ...]
    compressor: str | None = None
    chunk_key_separator: str = "."  # shard objects at ``c.0.1`` (format version 2) or ``c/0/1`` (version 1)

    def __post_init__(self) -> None:
        for name in ("shape", "chunk_shape", "inner_chunk_shape"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        dtype_info(self.dtype)  # raises TypeError for unsupported dtypes
        if not len(self.shape) == len(self.chunk_shape) == len(self.inner_chunk_shape):
            raise ValueError(f"{self}: shape, chunk_shape and inner_chunk_shape need one entry per dim")
        if any(s < 0 for s in self.shape) or any(c < 1 for c in self.chunk_shape + self.inner_chunk_shape):
            raise ValueError(f"{self}: sizes must be >= 0 and chunk sizes >= 1")
        if any(c % i for c, i in zip(self.chunk_shape, self.inner_chunk_shape)):
            raise ValueError(f"{self}: inner_chunk_shape must divide chunk_shape (Zarr requires it)")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"{self}: compressor must be one of {COMPRESSORS}")
        if self.chunk_key_separator not in CHUNK_KEY_SEPARATORS:
            raise ValueError(f"{self}: chunk_key_separator must be one of {CHUNK_KEY_SEPARATORS}")

    @property
    def info(self) -> DTypeInfo:
        return dtype_info(self.dtype)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of outer chunks (shard objects) along each dim."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape))

    @property
    def inner_grid_shape(self) -> tuple[int, ...]:
        """Number of inner chunks along each dim of one outer chunk."""
        return tuple(c // i for c, i in zip(self.chunk_shape, self.inner_chunk_shape))

    @property
    def inner_chunk_nbytes(self) -> int:
        """Bytes of one inner chunk before compression and without its crc32c."""
        return math.prod(self.inner_chunk_shape) * self.info.itemsize

    def chunk_coords(self) -> Iterator[tuple[int, ...]]:
        """Coordinates of every outer chunk, C order (none when a dim is empty; one, ``()``, for 0-d)."""
        return itertools.product(*(range(n) for n in self.grid_shape))

    def outer_chunk_box(self, coords: tuple[int, ...]) -> Box:
        """The region of the array held by outer chunk ``coords``, clipped to the array."""
        if len(coords) != len(self.shape) or any(not 0 <= c < n for c, n in zip(coords, self.grid_shape)):
            raise IndexError(f"chunk coords {coords} outside grid {self.grid_shape} of {self}")
        offsets = tuple(c * n for c, n in zip(coords, self.chunk_shape))
        sizes = tuple(min(n, s - o) for n, s, o in zip(self.chunk_shape, self.shape, offsets))
        return Box(offsets, sizes)

    def inner_boxes(self, coords: tuple[int, ...]) -> list[Box | None]:
        """Clipped region of each inner chunk of outer chunk ``coords`` (C order); None when outside."""
        outer = self.outer_chunk_box(coords)
        boxes: list[Box | None] = []
        for index in itertools.product(*(range(n) for n in self.inner_grid_shape)):
            offsets = tuple(o + i * n for o, i, n in zip(outer.offsets, index, self.inner_chunk_shape))
            sizes = tuple(min(n, s - o) for n, s, o in zip(self.inner_chunk_shape, self.shape, offsets))
            boxes.append(Box(offsets, sizes) if all(s > 0 for s in sizes) else None)
        return boxes


@dataclass(frozen=True)
class ByteRange:
    """Where one stored inner chunk (its bytes and crc32c) lies inside its shard object."""

    offset: int
    nbytes: int

    @property
    def stop(self) -> int:
        return self.offset + self.nbytes


def index_nbytes(layout: ArrayLayout) -> int:
    """Size of the shard index at the end of every shard object: 16 bytes per inner chunk + crc32c."""
    return math.prod(layout.inner_grid_shape) * 2 * _INDEX_DTYPE.itemsize + CRC_NBYTES


# -- encoding ------------------------------------------------------------------------------------------


def encode_shard(
    layout: ArrayLayout,
    coords: tuple[int, ...],
    data: torch.Tensor,
    out: torch.Tensor | None = None,
    each: Callable[[Callable[[Any], None], Sequence[Any]], object] | None = None,
) -> memoryview:
    """The shard object for outer chunk ``coords``; ``data`` holds exactly its clipped box.

    ``data`` may be non-contiguous; each inner chunk is gathered straight into the output buffer. Pass
    ``out`` (a uint8 CPU tensor) to reuse one buffer across calls: it is used when large enough (the
    result then aliases it), and touching fresh memory is the slow part on most machines. ``each(fn,
    items)`` calls ``fn`` on every item, in any order, on any threads (one after another by default):
    the inner chunks of an uncompressed object are gathered and checksummed independently, so a caller
    with cores to spare encodes one big object on several (the copies and checksums release the GIL).
    """
    box = layout.outer_chunk_box(coords)
    _check_data(layout, box, data)
    if layout.compressor is not None:
        return _encode_compressed(layout, coords, data, box)
    boxes = layout.inner_boxes(coords)
    stride = layout.inner_chunk_nbytes + CRC_NBYTES
    start = sum(b is not None for b in boxes) * stride
    buf = _buffer(out, start + index_nbytes(layout))
    index = np.full((len(boxes), 2), _MISSING, dtype=_INDEX_DTYPE)
    stored = [(i, inner) for i, inner in enumerate(boxes) if inner is not None]

    def put(k: int) -> None:  # the k-th stored inner chunk, at k strides
        pos = k * stride
        _gather(layout, buf[pos : pos + layout.inner_chunk_nbytes], data, box, stored[k][1])
        _put_crc(buf, pos, pos + layout.inner_chunk_nbytes)
        index[stored[k][0]] = (pos, stride)

    (each or _one_by_one)(put, range(len(stored)))
    _put_index(buf, start, index)
    return memoryview(buf.numpy()).cast("B")


def shard_parts(layout: ArrayLayout, coords: tuple[int, ...], data: torch.Tensor) -> list[memoryview] | None:
    """The shard object for outer chunk ``coords`` without copying ``data``: its own bytes, then its
    crc32c and the index (24 bytes); None unless the object is exactly that (uncompressed, one inner
    chunk that ``data`` fills, ``data`` contiguous), where ``encode_shard`` gathers a copy instead.

    Why: a small tensor's object is its bytes plus a tail, and copying them into a buffer first was a
    fifth of a 1000-tensor save. The caller must keep ``data`` unchanged until the object is written.
    """
    box = layout.outer_chunk_box(coords)
    _check_data(layout, box, data)
    whole = box.sizes == layout.chunk_shape == layout.inner_chunk_shape
    if layout.compressor is not None or not whole or not data.is_contiguous():
        return None
    values = memoryview(as_bytes(data.detach()).numpy()).cast("B")
    index = np.array([(0, len(values) + CRC_NBYTES)], dtype=_INDEX_DTYPE)
    return [values, memoryview(_crc_bytes(values) + _stored_index(index))]


def _one_by_one(fn: Callable[[Any], None], items: Sequence[Any]) -> None:
    for item in items:
        fn(item)


def _check_data(layout: ArrayLayout, box: Box, data: torch.Tensor) -> None:
    if tuple(data.shape) != box.sizes or data.dtype != layout.dtype or data.device.type != "cpu":
        raise ValueError(
            f"encode_shard: expected a CPU {layout.dtype} tensor of shape {list(box.sizes)} (outer chunk "
            f"at {list(box.offsets)}), got {data.device} {data.dtype} {list(data.shape)}"
        )


def _buffer(out: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    if out is not None and out.dtype == torch.uint8 and out.is_contiguous() and out.numel() >= nbytes:
        return out.view(-1)[:nbytes]
    return torch.empty(nbytes, dtype=torch.uint8)


def _gather(layout: ArrayLayout, dst: torch.Tensor, data: torch.Tensor, outer: Box, inner: Box) -> None:
    """Copy the part of ``data`` inside ``inner`` into ``dst`` laid out as one full inner chunk."""
    chunk = dst.view(layout.inner_chunk_shape + (layout.info.itemsize,))
    if inner.sizes != layout.inner_chunk_shape:
        chunk.zero_()  # padding where the inner chunk sticks out of the array
        chunk = chunk[tuple(slice(0, s) for s in inner.sizes)]
    values = as_bytes(data[inner.relative_to(outer)])
    if not copy_bytes(chunk, values):
        chunk.copy_(values)


def _put_crc(buf: torch.Tensor, start: int, stop: int) -> None:
    arr = buf.numpy()
    arr[stop : stop + CRC_NBYTES] = np.frombuffer(_crc_bytes(arr[start:stop]), dtype=np.uint8)


def _crc_bytes(data: object) -> bytes:
    return crc32c.crc32c(data).to_bytes(CRC_NBYTES, "little")


def _put_index(buf: torch.Tensor, start: int, index: np.ndarray) -> None:
    buf.numpy()[start:] = np.frombuffer(_stored_index(index), dtype=np.uint8)


def _stored_index(index: np.ndarray) -> bytes:
    """The shard index as stored: its little-endian (offset, nbytes) pairs, then their crc32c."""
    raw = index.tobytes()
    return raw + _crc_bytes(raw)


def _encode_compressed(
    layout: ArrayLayout, coords: tuple[int, ...], data: torch.Tensor, box: Box
) -> memoryview:
    """zstd between ``bytes`` and ``crc32c``: sizes vary, so stored chunks are concatenated."""
    codec = _zstd()
    scratch = torch.empty(layout.inner_chunk_nbytes, dtype=torch.uint8)
    boxes = layout.inner_boxes(coords)
    index = np.full((len(boxes), 2), _MISSING, dtype=_INDEX_DTYPE)
    parts: list[bytes] = []
    pos = 0
    for i, inner in enumerate(boxes):
        if inner is not None:
            _gather(layout, scratch, data, box, inner)
            stored = codec.encode(scratch.numpy())
            parts += [stored, _crc_bytes(stored)]
            index[i] = (pos, len(stored) + CRC_NBYTES)
            pos += len(stored) + CRC_NBYTES
    return memoryview(b"".join(parts + [_stored_index(index)]))


def _zstd():
    from numcodecs import Zstd  # zarr depends on numcodecs; imported only when compression is on

    return Zstd(level=ZSTD_LEVEL)


# -- decoding ------------------------------------------------------------------------------------------


def decode_index(
    layout: ArrayLayout, index_bytes: BytesLike, where: str, object_nbytes: int | None = None
) -> list[ByteRange | None]:
    """Parse and verify a shard index (the last ``index_nbytes(layout)`` bytes of a shard object).

    Given the object's size, every entry is also checked to lie inside it (``check_index_bounds``), so no
    read or allocation is ever sized by an entry the object's bytes do not back.
    """
    expected = index_nbytes(layout)
    raw = memoryview(index_bytes).cast("B")
    if len(raw) != expected:
        raise CorruptCheckpointError(
            f"{where}: shard index is {len(raw)} bytes, expected {expected}; the object is truncated "
            "or written with another layout — load an earlier checkpoint or re-run the save"
        )
    _verify_crc(raw, f"{where} (shard index)")
    pairs = np.frombuffer(raw[:-CRC_NBYTES], dtype=_INDEX_DTYPE).reshape(-1, 2).tolist()
    ranges = [None if o == _MISSING and n == _MISSING else ByteRange(o, n) for o, n in pairs]
    if object_nbytes is not None:
        check_index_bounds(layout, ranges, object_nbytes - expected, where)
    return ranges


def check_index_bounds(layout: ArrayLayout, ranges: list[ByteRange | None], data_nbytes: int, where: str) -> None:
    """Refuse index entries outside the object's first ``data_nbytes`` bytes (its chunk data), overlapping
    one another, or claiming sizes no inner chunk of ``layout`` has; a forged index then cannot make a
    reader fetch, allocate or decompress more than the object holds."""
    end = 0
    for i, r in sorted(((i, r) for i, r in enumerate(ranges) if r is not None), key=lambda pair: pair[1].offset):
        problem = _range_problem(layout, r, end, data_nbytes)
        if problem:
            raise CorruptCheckpointError(
                f"{where}: index entry {i} (offset {r.offset}, {r.nbytes} bytes) {problem}; the object was "
                "damaged or forged — load an earlier checkpoint or re-run the save"
            )
        end = r.stop


def _range_problem(layout: ArrayLayout, r: ByteRange, end: int, data_nbytes: int) -> str | None:
    stride = layout.inner_chunk_nbytes + CRC_NBYTES
    if r.offset < end:
        return f"overlaps the inner chunk stored before it (which ends at {end})"
    if r.stop > data_nbytes:
        return f"reaches past the object's {data_nbytes} bytes of chunk data"
    if layout.compressor is None and r.nbytes != stride:
        return f"is not the {stride} bytes every uncompressed inner chunk takes (data + crc32c)"
    if r.nbytes <= CRC_NBYTES:
        return "is too short to hold any data and its crc32c"
    if layout.inner_chunk_nbytes > (r.nbytes - CRC_NBYTES) * _ZSTD_MAX_RATIO:
        return (f"cannot decompress to the {layout.inner_chunk_nbytes} bytes of an inner chunk (zstd expands "
                f"at most {_ZSTD_MAX_RATIO}x)")
    return None


def inner_chunk_ranges(
    layout: ArrayLayout, coords: tuple[int, ...], index_bytes: BytesLike | None = None
) -> list[ByteRange | None]:
    """Byte range of each inner chunk of shard ``coords`` (C order), None for unstored ones.

    Uncompressed shards need no index: every stored chunk has the same size, in C order. Compressed
    shards need ``index_bytes`` (read it as the suffix ``read_range(key, -index_nbytes(layout), None)``).
    """
    if index_bytes is not None:
        return decode_index(layout, index_bytes, f"shard {list(coords)} of {layout}")
    if layout.compressor is not None:
        raise ValueError(f"shard {list(coords)} of {layout}: compressed shards need index_bytes to locate inner chunks")
    stride = layout.inner_chunk_nbytes + CRC_NBYTES
    grid = layout.inner_grid_shape
    # Along each dim, the inner chunks that start inside the array (the rest lie past its end: unstored).
    # Counted from the outer chunk's clipped box, not a box each: a load asks this of every object it
    # reads (the inner boxes cost 20 µs an object).
    outer = layout.outer_chunk_box(coords)  # raises IndexError for coords outside the grid
    inside = tuple(-(-size // i) for size, i in zip(outer.sizes, layout.inner_chunk_shape))
    if inside == grid:
        return [ByteRange(k * stride, stride) for k in range(math.prod(grid))]
    ranges: list[ByteRange | None] = []
    pos = 0
    for index in itertools.product(*(range(n) for n in grid)):
        stored = all(i < m for i, m in zip(index, inside))
        ranges.append(ByteRange(pos, stride) if stored else None)
        pos += stride if stored else 0
    return ranges


def decode_inner_chunk(layout: ArrayLayout, raw: BytesLike, where: str) -> torch.Tensor:
    """Verify one stored inner chunk (bytes + crc32c) and view it as a tensor of the full inner shape.

    ``where`` names the chunk in errors (object URL and inner chunk index). The result shares memory
    with ``raw`` when uncompressed; pass a writable buffer (``Storage`` returns ``bytearray``) so torch
    need not warn about a read-only one.
    """
    return inner_chunk_tensor(layout, inner_chunk_values(layout, raw, where))


def inner_chunk_values(layout: ArrayLayout, raw: BytesLike, where: str) -> memoryview:
    """Verify one stored inner chunk (bytes + crc32c); its values as C-order bytes of the full inner shape
    (a view of ``raw`` when uncompressed). ``decode_inner_chunk`` without making a tensor of them."""
    view = memoryview(raw).cast("B")
    nbytes = layout.inner_chunk_nbytes
    if len(view) < CRC_NBYTES or (layout.compressor is None and len(view) != nbytes + CRC_NBYTES):
        raise CorruptCheckpointError(
            f"{where}: inner chunk is {len(view)} bytes, expected {nbytes + CRC_NBYTES} (data + crc32c); "
            "the object is truncated or was overwritten — load an earlier checkpoint or re-run the save"
        )
    _verify_crc(view, where)
    payload = view[:-CRC_NBYTES]
    return payload if layout.compressor is None else _decompress(payload, nbytes, where)


def inner_chunk_tensor(layout: ArrayLayout, values: memoryview) -> torch.Tensor:
    """An inner chunk's verified ``values`` (``inner_chunk_values``) as a tensor of the full inner shape,
    sharing their memory."""
    flat = torch.frombuffer(values, dtype=torch.uint8, count=layout.inner_chunk_nbytes)
    return flat.view(layout.dtype).reshape(layout.inner_chunk_shape)


def _verify_crc(view: memoryview, where: str) -> None:
    check_crc(view[:-CRC_NBYTES], view[-CRC_NBYTES:], where)


def check_crc(data: BytesLike, crc: BytesLike, where: str) -> None:
    """Refuse ``data`` unless its crc32c equals ``crc`` (4 bytes, little-endian), naming ``where``."""
    stored = int.from_bytes(crc, "little")
    computed = crc32c.crc32c(data)
    if stored != computed:
        raise CorruptCheckpointError(
            f"{where}: crc32c mismatch (stored 0x{stored:08x}, computed 0x{computed:08x}); the bytes were "
            "damaged after the save — load an earlier checkpoint or re-run the save"
        )


def _decompress(payload: memoryview, nbytes: int, where: str) -> memoryview:
    """The ``nbytes`` an inner chunk decompresses to. numcodecs fills a too-large ``out`` with what the
    frame holds and leaves the rest zero, so a frame that does not say it holds exactly ``nbytes`` (a
    chunk of another layout, a dtype or shape changed in both records) is decompressed on its own and
    its size compared: never zeros in place of values."""
    out = bytearray(nbytes)
    try:
        if _frame_content_size(payload) == nbytes:
            _zstd().decode(payload, out=out)  # a bigger content overflows ``out`` and raises
        else:
            data = _zstd().decode(payload)
            if len(data) != nbytes:
                raise ValueError(f"the chunk holds {len(data)} bytes")
            out[:] = data
    except Exception as exc:  # numcodecs raises RuntimeError/ValueError variants
        raise CorruptCheckpointError(
            f"{where}: zstd decompression failed ({exc}) although the crc32c matched; the chunk was written "
            f"with another layout (expected {nbytes} bytes) — re-run the save"
        ) from exc
    return memoryview(out)


_FCS_BYTES = (0, 2, 4, 8)  # a zstd frame's content size field, by the top two bits of its header byte


def _frame_content_size(payload: memoryview) -> int | None:
    """The content size the zstd frame header at the start of ``payload`` declares, or None (no zstd
    frame, or it declares none). RFC 8878 section 3.1.1.1; a few bytes read, never the data."""
    if len(payload) < 6 or bytes(payload[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    flags = payload[4]
    single_segment = flags >> 5 & 1
    size_bytes = _FCS_BYTES[flags >> 6] or single_segment  # flag 0: one byte in a single segment, else none
    start = 5 + (not single_segment) + (0, 1, 2, 4)[flags & 3]  # after the window and dictionary id fields
    if not size_bytes or len(payload) < start + size_bytes:
        return None
    size = int.from_bytes(payload[start : start + size_bytes], "little")
    return size + 256 if size_bytes == 2 else size
