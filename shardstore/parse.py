"""Parsing ``zarr.json`` text read back from storage: every malformed or foreign field becomes a
``CorruptCheckpointError`` naming the file, instead of a ``KeyError`` deep in a load.

``shardstore.format`` writes these files (and re-exports ``parse_group_json`` and ``parse_array_json``);
the codec descriptions below are the one copy both sides use, so what is written is what is accepted.
"""

from __future__ import annotations

import json
from typing import Any

from shardstore.codec import CHUNK_KEY_SEPARATORS, ZSTD_LEVEL, ArrayLayout
from shardstore.dtypes import dtype_info_by_name
from shardstore.errors import CorruptCheckpointError

__all__ = [
    "BYTES_CODEC", "CRC32C_CODEC", "ZSTD_CODEC", "load_json", "get_field", "expect", "int_list", "parse_group_json",
    "parse_array_json",
]

BYTES_CODEC = {"name": "bytes", "configuration": {"endian": "little"}}
CRC32C_CODEC = {"name": "crc32c"}
ZSTD_CODEC = {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON (shardstore writes with allow_nan=False)")


def load_json(text: bytes | bytearray | str, where: str) -> dict[str, Any]:
    try:
        node = json.loads(text, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({exc}); the file is damaged — load an "
                                     "earlier checkpoint or re-run the save") from exc
    if not isinstance(node, dict):
        raise CorruptCheckpointError(f"{where}: expected a JSON object, got {type(node).__name__}")
    return node


def get_field(node: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = node.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptCheckpointError(
            f"{where}: field {key!r} missing or of the wrong type: expected {kind.__name__}, got {value!r}; "
            "the file is damaged or was not written by shardstore"
        )
    return value


def expect(ok: bool, where: str, what: str, got: Any) -> None:
    if not ok:
        raise CorruptCheckpointError(f"{where}: expected {what}, got {got!r}; no shardstore save wrote this (or the "
                                     "file is damaged) — load an earlier checkpoint or re-run the save")


def _node_of(text: bytes | bytearray | str, node_type: str, where: str) -> dict[str, Any]:
    node = load_json(text, where)
    expect(node.get("zarr_format") == 3, where, "zarr_format 3", node.get("zarr_format"))
    expect(node.get("node_type") == node_type, where, f"node_type {node_type!r}", node.get("node_type"))
    return node


def parse_group_json(text: bytes | bytearray | str, where: str) -> dict[str, Any]:
    """The attributes of a group ``zarr.json`` read from ``where`` (absent attributes are ``{}``)."""
    attributes = _node_of(text, "group", where).get("attributes", {})
    expect(isinstance(attributes, dict), where, "attributes as a JSON object", attributes)
    return attributes


def int_list(value: Any, where: str, what: str) -> tuple[int, ...]:
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    expect(ok, where, f"{what} as a list of integers", value)
    return tuple(value)


def _parse_sharding(codecs: Any, where: str) -> tuple[tuple[int, ...], str | None]:
    """Inner chunk shape and compressor from the codec list; anything but our one pipeline is refused."""
    expect(isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)
           and codecs[0].get("name") == "sharding_indexed", where, "one sharding_indexed codec", codecs)
    config = codecs[0].get("configuration") or {}
    inner = config.get("codecs")
    zstd = isinstance(inner, list) and len(inner) == 3 and isinstance(inner[1], dict) and inner[1].get("name") == "zstd"
    expected = [BYTES_CODEC, inner[1], CRC32C_CODEC] if zstd else [BYTES_CODEC, CRC32C_CODEC]
    expect(inner == expected, where, "inner codecs bytes(little), [zstd], crc32c", inner)
    expect(config.get("index_codecs") == [BYTES_CODEC, CRC32C_CODEC], where, "index codecs bytes(little), crc32c",
           config.get("index_codecs"))
    location = config.get("index_location", "end")
    expect(location == "end", where, "index_location 'end'", location)
    return int_list(config.get("chunk_shape"), where, "inner chunk_shape"), "zstd" if zstd else None


def parse_array_json(text: bytes | bytearray | str, where: str) -> ArrayLayout:
    """The ``ArrayLayout`` of an array ``zarr.json`` read from ``where``, validated."""
    node = _node_of(text, "array", where)
    info = dtype_info_by_name(node.get("data_type"), where)
    grid = get_field(node, "chunk_grid", dict, where)
    expect(grid.get("name") == "regular", where, "a regular chunk grid", grid)
    keys = get_field(node, "chunk_key_encoding", dict, where)
    separator = (keys.get("configuration") or {}).get("separator")
    expect(keys.get("name") == "default" and separator in CHUNK_KEY_SEPARATORS,
           where, "chunk_key_encoding default with '.' or '/'", keys)
    fill = node.get("fill_value")
    expect(fill == info.fill_value, where, f"fill_value {info.fill_value!r}", fill)
    inner, compressor = _parse_sharding(node.get("codecs"), where)
    try:
        return ArrayLayout(
            shape=int_list(node.get("shape"), where, "shape"),
            dtype=info.torch_dtype,
            chunk_shape=int_list((grid.get("configuration") or {}).get("chunk_shape"), where, "chunk_shape"),
            inner_chunk_shape=inner,
            compressor=compressor,
            chunk_key_separator=separator,
        )
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: inconsistent array metadata: {exc}") from exc
