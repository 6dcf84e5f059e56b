"""Pin the exact ``zarr.json`` text shardstore writes (format version 2, docs/format.md), and that
version 1 files (``*_v1.json``, shard objects at ``c/0/1``) still read.

A diff here is a format change: update docs/format.md (and the version, if old readers would break)
before regenerating the files under ``expected/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardstore import format as fmt
from shardstore.codec import ArrayLayout
from shardstore.dtypes import DTYPES
from shardstore.errors import CorruptCheckpointError

EXPECTED = Path(__file__).parent / "expected"


def _expected(name: str) -> str:
    return (EXPECTED / name).read_text().removesuffix("\n")


def _root() -> fmt.RootMetadata:
    layout = ArrayLayout((5, 7), torch.bfloat16, (4, 4), (2, 2))
    return fmt.RootMetadata(
        tree={"dict": {"model": {"dict": {"w": {"tensor": ["model", "w"]}}}, "step": {"value": 3}}},
        tensors={"model/w": fmt.TensorRecord.from_layout("model/w", layout, (2,), ("S(0)",))},
        user_metadata={"run": "x"},
        torch_version="2.13.0",
        shardstore_version="0.1.0",
        commit_id="0123456789abcdef0123456789abcdef",
    )


def test_array_json_text():
    layout = ArrayLayout((5, 7), torch.float32, (4, 4), (2, 2))
    text = fmt.array_json(layout)
    assert text == _expected("array_float32_5x7.json")
    assert "dimension_names" not in text  # tensorstore refuses null
    assert fmt.parse_array_json(text, "x") == layout


@pytest.mark.parametrize("dtype", [info.torch_dtype for info in DTYPES], ids=str)
def test_array_json_is_the_whole_node_rendered_for_every_layout(dtype):
    """array_json fills shapes into a text rendered once per dtype, compressor and separator: for every
    layout it must still be the node's canonical text (top level indented, the rest inline) and parse
    back to that layout."""
    shapes = [((), (), ()), ((5,), (4,), (2,)), ((3, 0, 7), (2, 1, 7), (1, 1, 7)), ((1000, 1024), (1000, 1024), (1000, 256))]
    for shape, chunks, inner in shapes:
        for compressor in (None, "zstd"):
            for separator in (".", "/"):
                layout = ArrayLayout(shape, dtype, chunks, inner, compressor, separator)
                text = fmt.array_json(layout)
                node = json.loads(text)
                assert text == fmt._dumps(node, "x")
                assert node["shape"] == list(shape) and node["chunk_grid"]["configuration"]["chunk_shape"] == list(chunks)
                assert node["codecs"][0]["configuration"]["chunk_shape"] == list(inner)
                assert fmt.parse_array_json(text, "x") == layout


def test_version_1_files_still_read_with_their_slash_separated_chunk_keys():
    layout = fmt.parse_array_json(_expected("array_float32_5x7_v1.json"), "x")
    assert layout == ArrayLayout((5, 7), torch.float32, (4, 4), (2, 2), chunk_key_separator="/")
    assert fmt.object_key("model/w", layout, (1, 0)) == "model/w/c/1/0"
    block = fmt.parse_group_json(_expected("root_v1.json"), "x")[fmt.FORMAT_NAME]
    record = fmt.RootMetadata.from_json(block, "x").tensors["model/w"]
    assert record.layout.chunk_key_separator == "/"
    assert fmt.object_key(record.path, record.layout, (1, 1)) == "model/w/c/1/1"


def test_chunk_key_separator_other_than_dot_or_slash_is_refused():
    text = fmt.array_json(ArrayLayout((5, 7), torch.float32, (4, 4), (2, 2))).replace('"separator": "."', '"separator": "-"')
    with pytest.raises(CorruptCheckpointError, match="chunk_key_encoding"):
        fmt.parse_array_json(text, "x")
    block = _root().to_json()
    del block["tensors"]["model/w"]["chunk_key_separator"]
    with pytest.raises(CorruptCheckpointError, match="chunk_key_separator"):
        fmt.RootMetadata.from_json(block | {"checksum": fmt.root_checksum(block)}, "x")


def test_group_json_text():
    assert fmt.group_json() == _expected("group_empty.json")


def test_root_json_text_and_round_trip():
    text = fmt.root_json(_root())
    assert text == _expected("root.json")
    block = fmt.parse_group_json(text, "x")[fmt.FORMAT_NAME]
    assert fmt.RootMetadata.from_json(block, "x") == _root()


@pytest.mark.parametrize("dtype,fill", [(torch.bool, "false"), (torch.int32, "0"), (torch.float8_e5m2, "0.0"),
                                        (torch.complex64, "[0.0, 0.0]")])
def test_fill_value_per_dtype(dtype, fill):
    text = fmt.array_json(ArrayLayout((2,), dtype, (2,), (1,)))
    assert f'"fill_value": {fill},' in text


def test_chunk_keys():
    assert fmt.chunk_key((0, 1)) == "c.0.1" and fmt.chunk_key((0, 1), "/") == "c/0/1"
    assert fmt.chunk_key(()) == "c"
    assert fmt.node_key("") == "zarr.json" and fmt.node_key("model/w") == "model/w/zarr.json"
    assert fmt.group_paths(["a/b/c", "a/d", "e"]) == ["a", "a/b"]


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t[:-3], "not valid JSON"),
    (lambda t: t.replace('"node_type": "array"', '"node_type": "group"'), "node_type 'array'"),
    (lambda t: t.replace('"float32"', '"float42"'), "unknown data_type 'float42'"),
    (lambda t: t.replace('"regular"', '"rectilinear"'), "regular chunk grid"),
    (lambda t: t.replace('"index_location": "end"', '"index_location": "start"'), "index_location"),
    (lambda t: t.replace('"fill_value": 0.0', '"fill_value": 1.0'), "fill_value"),
    (lambda t: t.replace('"shape": [5', '"shape": ["5"'), "shape as a list of integers"),
])
def test_malformed_array_json_names_the_file(mutate, match):
    text = mutate(fmt.array_json(ArrayLayout((5, 7), torch.float32, (4, 4), (2, 2))))
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        fmt.parse_array_json(text, "memory://ck/model/w/zarr.json")
    assert "memory://ck/model/w/zarr.json" in str(info.value)


def test_root_from_newer_format_asks_for_an_upgrade():
    block = _root().to_json() | {"version": 3}
    with pytest.raises(CorruptCheckpointError, match="upgrade shardstore"):
        fmt.RootMetadata.from_json(block, "x")


@pytest.mark.parametrize("layout", [
    ArrayLayout((), torch.bool, (), (), "zstd"),
    ArrayLayout((0, 3), torch.complex128, (1, 3), (1, 1)),
    ArrayLayout((9, 4, 2), torch.float8_e4m3fn, (3, 4, 2), (3, 2, 1), "zstd"),
])
def test_parse_inverts_array_json(layout):
    assert fmt.parse_array_json(fmt.array_json(layout), "x") == layout
