"""Show what a checkpoint holds: the tree of keys with shape, dtype, size, chunk layout, save-time mesh
and placements, and the user metadata. For a sharded 2-D tensor, a drawing of which rank held which
block. Reads only the root record."""

from __future__ import annotations

import argparse
import json

from shardstore.storage import Storage
from shardstore.cli.common import EXIT_OK, human_bytes, print_json, refuse_other_contents, storage_options
from shardstore.errors import IncompleteCheckpointError
from shardstore.inspect import CheckpointInfo, TensorInfo, describe

NAME = "inspect"
HELP = "show the keys, shapes, dtypes, chunk layout and save-time sharding of a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the checkpoint")
    parser.add_argument("key", metavar="KEY", nargs="?", help="show only this tensor (dotted name), with its owner drawing")


def run(args: argparse.Namespace) -> int:
    try:
        info = describe(args.url, storage_options(args))
    except IncompleteCheckpointError:
        refuse_other_contents(Storage(args.url, storage_options(args)), "inspect")
        raise
    if args.key is not None:
        tensor = _tensor(info, args.key)
        if args.json:
            print_json(tensor.to_json() | {"name": tensor.name})
        else:
            print(_tensor_text(tensor, owners=True))
    elif args.json:
        print_json(info.to_json())
    else:
        print(_checkpoint_text(info))
    return EXIT_OK


def _tensor(info: CheckpointInfo, key: str) -> TensorInfo:
    if key not in info.tensors:
        raise KeyError(f"{key!r} is not a tensor of checkpoint {info.url}; it has {sorted(info.tensors)[:10]} "
                       "(run 'shardstore inspect URL' for the whole list)")
    return info.tensors[key]


def _checkpoint_text(info: CheckpointInfo) -> str:
    lines = [f"{info.url}: {len(info.tensors)} tensors, {human_bytes(info.nbytes)} "
             f"(commit {info.commit_id}, shardstore {info.shardstore_version}, torch {info.torch_version})"]
    if info.user_metadata:
        lines.append(f"user metadata: {json.dumps(info.user_metadata)}")
    lines += _tree_lines(info.tree, 0)
    for tensor in info.tensors.values():
        if (art := tensor.owners()) is not None:
            lines += ["", f"{tensor.name} owners at save ({_sharding(tensor)}):", art]
    return "\n".join(lines)


def _tree_lines(node, depth: int) -> list[str]:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    lines = []
    for name, value in items:
        pad = "  " * depth
        if isinstance(value, TensorInfo):
            lines.append(f"{pad}{name}: {_tensor_text(value, owners=False)}")
        elif isinstance(value, (dict, list, tuple)):
            lines += [f"{pad}{name}/", *_tree_lines(value, depth + 1)]
        else:
            lines.append(f"{pad}{name} = {value!r}")
    return lines


def _tensor_text(t: TensorInfo, *, owners: bool) -> str:
    text = (f"{t.dtype}{list(t.shape)} {human_bytes(t.nbytes)}  chunks {list(t.chunk_shape)} "
            f"inner {list(t.inner_chunk_shape)}{'' if t.compressor is None else ' ' + t.compressor}  {_sharding(t)}")
    art = t.owners() if owners else None
    return text if art is None else f"{t.name}: {text}\n{art}"


def _sharding(t: TensorInfo) -> str:
    if not t.mesh_shape:
        return "plain tensor"
    return f"mesh {list(t.mesh_shape)} [{', '.join(t.placements)}]"
