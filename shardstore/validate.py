"""Checks of a root record read back from storage, before anything trusts it. Pure: no I/O.

A checkpoint's bytes may have been damaged (one flipped bit) or forged by hand. Everything a load does
is planned from the root record, so it is checked here first, in full:

* ``verify_root_checksum``: the record carries a checksum of itself (``root_checksum``: sha256 over a
  canonical JSON dump of the block without its ``checksum``), so a flipped bit anywhere in it is an
  error instead of, say, a saved ``step`` 7 silently loading as 5;
* ``tree_tensor_keys``: the state-dict tree follows ``shardstore.flatten``'s grammar at every node, and
  each tensor node names exactly the key path it sits at;
* ``check_tensors_match_tree``: each tensor of the tree has exactly one entry in ``tensors`` and vice
  versa, keyed by ``flatten.node_path`` of its key path;
* ``check_sane_grid``: no chunk is larger than its array and no grid has more chunks than its bytes
  could back, so no loop or allocation is sized by an absurd claim.

Every failure is a ``CorruptCheckpointError`` naming the file and the entry.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from shardstore.codec import ArrayLayout
from shardstore.errors import CorruptCheckpointError
from shardstore.flatten import KeyPath, fqn, node_path

__all__ = [
    "CHECKSUM_PREFIX", "SMALL_GRID_CHUNKS", "MIN_AVERAGE_CHUNK_BYTES",
    "root_checksum", "verify_root_checksum", "tree_tensor_keys", "check_tensors_match_tree", "check_sane_grid",
]

CHECKSUM_PREFIX = "sha256:"
SMALL_GRID_CHUNKS = 1 << 20
"""Up to this many inner chunks an array's grid is never called absurd, whatever its size."""
MIN_AVERAGE_CHUNK_BYTES = 64
"""Beyond ``SMALL_GRID_CHUNKS`` inner chunks, an array must hold at least this many bytes per inner chunk:
each stored one costs 20 bytes of crc and index, and shardstore's saves aim at ~4 MiB."""

_FIX = "the root zarr.json was damaged or hand-edited — load an earlier checkpoint or re-run the save"
_PLAIN = (bool, int, str, type(None))
_BODY_TYPES: dict[str, type | tuple[type, ...]] = {
    "dict": dict, "map": list, "list": list, "tuple": list, "tensor": list, "value": _PLAIN + (float,), "float": str,
}


def root_checksum(block: dict[str, Any]) -> str:
    """``sha256:<hex>`` of ``block`` without its ``checksum``, dumped canonically (sorted keys, no spaces)."""
    body = {k: v for k, v in block.items() if k != "checksum"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the root record must be plain JSON (str, int, float, bool, None, list, dict with str "
                        f"keys, no NaN/inf): {exc}") from exc
    return CHECKSUM_PREFIX + hashlib.sha256(text.encode()).hexdigest()


def verify_root_checksum(block: dict[str, Any], where: str) -> None:
    """Refuse a root record whose checksum is missing or does not match its content."""
    stored = block.get("checksum")
    if not isinstance(stored, str) or not stored.startswith(CHECKSUM_PREFIX):
        raise CorruptCheckpointError(
            f"{where}: the root record has no valid checksum (field 'checksum': {_short(stored)}, expected "
            f"'{CHECKSUM_PREFIX}<hex>'); it was damaged, hand-edited, or written before shardstore sealed root "
            "records — load an earlier checkpoint or re-run the save"
        )
    try:
        computed = root_checksum(block)
    except TypeError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}; {_FIX}") from exc
    if stored != computed:
        raise CorruptCheckpointError(
            f"{where}: the root record does not match its checksum (stored {stored}, computed {computed}): the "
            "file was damaged (a flipped bit) or edited after the save, so none of it is trusted — load an "
            "earlier checkpoint or re-run the save"
        )


def tree_tensor_keys(tree: Any, where: str) -> list[KeyPath]:
    """Validate the state-dict tree at every node; the key path of every tensor in it, in tree order."""
    if not (isinstance(tree, dict) and next(iter(tree), None) in ("dict", "map")):
        _bad_tree(where, (), "a {'dict': {...}} or {'map': [...]} node at the root", tree)
    keys: list[KeyPath] = []
    stack: list[tuple[Any, KeyPath]] = [(tree, ())]
    while stack:
        node, path = stack.pop()
        kind, body = _entry(node, path, where)
        if kind == "dict":
            stack.extend((child, path + (k,)) for k, child in reversed(body.items()))
        elif kind == "map":
            stack.extend((child, path + (k,)) for k, child in reversed(_map_pairs(body, path, where)))
        elif kind in ("list", "tuple"):
            stack.extend((child, path + (i,)) for i, child in reversed(list(enumerate(body))))
        elif kind == "tensor":
            _check_tensor_node(body, path, where)
            keys.append(path)
        elif kind == "float" and body not in ("nan", "inf", "-inf"):
            _bad_tree(where, path, "'nan', 'inf' or '-inf' in a float node", body)
        elif kind == "value" and isinstance(body, float) and not math.isfinite(body):
            _bad_tree(where, path, "a finite float in a value node", body)
    return keys


def _entry(node: Any, path: KeyPath, where: str) -> tuple[str, Any]:
    """The (kind, body) of one tree node, both checked against the grammar."""
    if not isinstance(node, dict) or len(node) != 1:
        _bad_tree(where, path, f"a node with one entry of {sorted(_BODY_TYPES)}", node)
    (kind, body), = node.items()
    if kind not in _BODY_TYPES:
        _bad_tree(where, path, f"a node kind of {sorted(_BODY_TYPES)}", kind)
    wanted = _BODY_TYPES[kind]
    if not isinstance(body, wanted):
        _bad_tree(where, path, f"a {kind} node holding {getattr(wanted, '__name__', 'a plain JSON value')}", body)
    return kind, body


def _map_pairs(body: list, path: KeyPath, where: str) -> list[tuple[str | int, Any]]:
    """A map node's ``[key, node]`` pairs, each key a str or int (not bool) and no key twice."""
    for pair in body:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))
                and not isinstance(pair[0], bool)):
            _bad_tree(where, path, "[key, node] pairs with str or int keys in a map node", pair)
    if len({(type(k), k) for k, _ in body}) != len(body):
        _bad_tree(where, path, "distinct keys in a map node", [k for k, _ in body])
    return [(k, child) for k, child in body]


def _check_tensor_node(body: list, path: KeyPath, where: str) -> None:
    """A tensor node names the key path it sits at: str for dict keys, int for list/tuple indices."""
    typed = [(type(c), c) for c in body]
    if typed != [(type(c), c) for c in path]:
        _bad_tree(where, path, f"a tensor node naming its own key path {list(path)!r}", body)


def check_tensors_match_tree(tree: Any, tensors: dict[str, Any], where: str) -> None:
    """Each tensor of the tree has exactly one ``tensors`` entry, keyed by its node path, and vice versa."""
    keys = tree_tensor_keys(tree, where)
    nodes = {node_path(key): key for key in keys}
    if len(nodes) != len(keys):
        raise CorruptCheckpointError(f"{where}: two tensors of the tree map to one node path; {_FIX}")
    for name, record in tensors.items():
        if record.path != name:
            raise CorruptCheckpointError(f"{where}: tensor entry {name!r} has path {record.path!r}; "
                                         f"expected the two to be equal; {_FIX}")
    for name, key in nodes.items():
        if name not in tensors:
            raise CorruptCheckpointError(f"{where}: the tree has tensor {fqn(key)!r} (node {name!r}) but 'tensors' "
                                         f"has no entry for it; {_FIX}")
    for name in tensors:
        if name not in nodes:
            raise CorruptCheckpointError(f"{where}: tensor entry {name!r} is not in the tree (no key path maps "
                                         f"to it); {_FIX}")


def check_sane_grid(layout: ArrayLayout, where: str) -> None:
    """Refuse chunks larger than their array and grids with more chunks than their bytes could back.

    No shardstore save makes either, and both would size a loop or an allocation by a claim: a read plans
    one task per inner chunk it meets and reads a 16-byte index entry per inner chunk of every object.
    """
    for d, (size, chunk) in enumerate(zip(layout.shape, layout.chunk_shape)):
        if chunk > max(size, 1):
            raise CorruptCheckpointError(f"{where}: chunk size {chunk} along dim {d} is larger than the array's "
                                         f"size {size} there; {_FIX}")
    chunks = math.prod(layout.grid_shape) * math.prod(layout.inner_grid_shape)
    nbytes = math.prod(layout.shape) * layout.info.itemsize
    if chunks > SMALL_GRID_CHUNKS and chunks * MIN_AVERAGE_CHUNK_BYTES > nbytes:
        raise CorruptCheckpointError(
            f"{where}: a grid of {chunks} inner chunks for {nbytes} bytes of data (under {MIN_AVERAGE_CHUNK_BYTES} "
            f"bytes per chunk, beyond {SMALL_GRID_CHUNKS} chunks) is absurd: no save makes it and reading it would "
            f"loop over every chunk; {_FIX}"
        )


def _bad_tree(where: str, path: KeyPath, expected: str, got: Any):
    raise CorruptCheckpointError(f"{where}: state-dict tree at {fqn(path) or '<root>'!r}: expected {expected}, "
                                 f"got {_short(got)}; {_FIX}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
