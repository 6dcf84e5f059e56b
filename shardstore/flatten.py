"""State dict <-> flat tensor items plus a JSON skeleton, and key paths <-> Zarr node names.

A checkpoint stores every tensor as one Zarr array and everything else inline in the root ``zarr.json``.
``flatten`` walks a nested state dict once and splits it accordingly:

* ``items``: ``{key path: tensor}`` for every tensor leaf (a ``torch.Tensor``, or any object with DCP's
  checkpoint hooks such as torch's DTensor and ours). A key path is a tuple of ``str`` and ``int`` (dict
  keys, and list/tuple indices).
* ``skeleton``: a JSON-serialisable tree that records dicts, lists and tuples, holds plain values
  (int, float, str, bool, None) inline and refers to tensors by their key path, so ``unflatten`` can
  rebuild the exact structure around loaded tensors.

Skeleton nodes are one-entry objects: ``{"dict": {key: node}}``, ``{"list": [node]}``,
``{"tuple": [node]}``, ``{"tensor": [key path]}``, ``{"value": v}`` and, for floats JSON cannot hold,
``{"float": "nan" | "inf" | "-inf"}``. A mapping with an ``int`` key (an optimizer's ``state``, keyed by
parameter index) is ``{"map": [[key, node], ...]}``: JSON objects hold only string keys, and ``0`` must
not come back as ``"0"``. Mappings come back as plain ``dict`` and tuple subclasses (``torch.Size``,
named tuples) as plain ``tuple`` from ``unflatten``; a load keeps the target's own types (``fill_plain_values``).

Node names: each key path component is percent-encoded so that no key can name a path outside the
checkpoint or a name Zarr reserves, and one too long for a file name gets a stable short form. See
``node_path``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch

from shardstore.errors import CorruptCheckpointError, StateDictMismatchError, UnsupportedInputError

__all__ = [
    "KeyPath", "flatten", "unflatten", "fill_plain_values", "plain_differences", "merge_skeletons", "is_tensor_like", "node_path",
    "mapping_node", "mapping_children", "node_children",
    "keypath_from_node", "fqn", "display_names", "int_too_long", "MAX_DEPTH",
]

KeyPath = tuple[Union[str, int], ...]

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_EMPTY = "%"  # a lone '%' never comes out of encoding a non-empty component, so it can stand for ""
_RESERVED = {".": "%2E", "..": "%2E%2E", "zarr.json": "zarr%2Ejson"}
_PLAIN = (bool, int, str, type(None))
_INT_LIMIT = 10**4300  # Python's default limit of digits for int <-> str: JSON of a longer int neither writes nor reads back
MAX_DEPTH = 100  # containers nested deeper are refused (a list that holds itself would never end)


def is_tensor_like(value: Any) -> bool:
    """True for values saved as arrays: torch tensors and objects with DCP's checkpoint hooks."""
    return isinstance(value, torch.Tensor) or hasattr(type(value), "__create_write_items__")


def flatten(state_dict: Mapping[str, Any]) -> tuple[dict[KeyPath, Any], dict]:
    """Split a state dict into ``{key path: tensor}`` and a JSON skeleton (see the module docstring)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"a state dict must be a mapping of str keys, got {type(state_dict).__name__}")
    items: dict[KeyPath, Any] = {}
    return items, _encode(state_dict, (), items)


def _encode(value: Any, path: KeyPath, items: dict[KeyPath, Any]) -> dict:
    if len(path) > MAX_DEPTH:
        raise UnsupportedInputError(
            f"state dict entry {fqn(path[:3])!r}... is nested more than {MAX_DEPTH} containers deep (does a list or "
            "dict hold itself?); a checkpoint holds a tree of containers: flatten it or store it as a str first"
        )
    if int_too_long(value):
        raise UnsupportedInputError(
            f"state dict entry {fqn(path)!r} is an int of more than 4300 digits, which JSON (the root zarr.json) "
            "cannot carry back; store it as a str (str(x)) or a tensor first"
        )
    if is_tensor_like(value):
        items[path] = value
        return {"tensor": list(path)}
    if isinstance(value, Mapping):
        children = {_dict_key(k, path, value): _encode(v, path + (k,), items) for k, v in value.items()}
        return mapping_node(children)
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, path + (i,), items) for i, v in enumerate(value)]}
    if type(value) is float:
        return {"value": value} if math.isfinite(value) else {"float": repr(value)}
    if type(value) in _PLAIN:
        return {"value": value}
    raise UnsupportedInputError(_unsupported_leaf(value, path))


def _unsupported_leaf(value: Any, path: KeyPath) -> str:
    """Why ``value`` cannot be a leaf. Subclasses of the plain types (an IntEnum, numpy.float64) are refused
    too: JSON stores the value of the base type, so the load would give that back, the type silently lost."""
    kind = type(value)
    name = f"numpy.{kind.__name__}" if kind.__module__ == "numpy" else kind.__name__
    base = next((t for t in (int, float, str) if isinstance(value, t)), None)
    if base is not None:
        return (f"state dict entry {fqn(path)!r} is a {name}, a subclass of {base.__name__} that would load back as "
                f"a plain {base.__name__}, its type lost: store {base.__name__}(x) (or a tensor) and convert it back")
    hint = " (x.item() for a numpy scalar, torch.from_numpy(x) for an array)" if kind.__module__ == "numpy" else ""
    return (f"state dict entry {fqn(path)!r} is a {name}; a checkpoint holds tensors, int, float, str, bool, None "
            f"and dicts/lists/tuples of them: convert it (e.g. to a tensor or str) first{hint}")


def _dict_key(key: Any, path: KeyPath, mapping: Mapping) -> str | int:
    if type(key) not in (str, int):  # a subclass (an IntEnum) would come back as its base type
        raise TypeError(
            f"state dict key {key!r} under {fqn(path) or '<root>'!r} is a {type(key).__name__}; keys must be str "
            "or int: convert the keys to str"
        )
    if isinstance(key, str) and not _is_unicode(key):
        raise UnsupportedInputError(
            f"state dict key {key!r} under {fqn(path) or '<root>'!r} is not valid Unicode (it holds a lone "
            "surrogate), so it can name no file nor JSON entry; fix the key"
        )
    if isinstance(key, int) and str(key) in mapping:
        raise UnsupportedInputError(
            f"state dict keys {key!r} and {str(key)!r} under {fqn(path) or '<root>'!r} would share one node name "
            "in the checkpoint; rename one of them"
        )
    return key


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def int_too_long(value: Any) -> bool:
    """Whether ``value`` is an int with more digits than JSON here writes and reads back (4300)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT_LIMIT


def mapping_node(children: Mapping[str | int, dict]) -> dict:
    """The skeleton node of a mapping with these children: a ``dict`` node when every key is a str,
    else a ``map`` node of ``[key, node]`` pairs (see the module docstring)."""
    if all(isinstance(k, str) for k in children):
        return {"dict": dict(children)}
    return {"map": [[k, v] for k, v in children.items()]}


def node_children(node: dict) -> list[tuple[str | int, dict]]:
    """The (key or index, child) pairs of a container node, in order; none for a leaf."""
    (kind, body), = node.items()
    if kind == "dict":
        return list(body.items())
    if kind == "map":
        return [(k, child) for k, child in body]
    return list(enumerate(body)) if kind in ("list", "tuple") else []


def mapping_children(node: dict) -> dict[str | int, dict] | None:
    """The children of a ``dict`` or ``map`` node by key; None for any other node."""
    (kind, body), = node.items()
    if kind == "dict":
        return body
    return {k: v for k, v in body} if kind == "map" else None


def merge_skeletons(skeletons: list[dict]) -> dict:
    """One skeleton for a save from every rank's (in rank order): dicts are united, so per-rank keys
    (``dataloader.rank3``) all survive; lists, tuples and plain values must agree where ranks share them,
    since each is saved once."""
    return _merge([(rank, s) for rank, s in enumerate(skeletons)], ())


def _merge(nodes: list[tuple[int, dict]], path: KeyPath) -> dict:
    (rank, first), *rest = nodes
    kind = next(iter(first))
    if kind in ("dict", "map"):
        keys: dict[str | int, list[tuple[int, dict]]] = {}
        for r, node in nodes:
            children = mapping_children(node)
            if children is None:
                _conflict(path, rank, first, r, node)
            for k, child in children.items():
                keys.setdefault(k, []).append((r, child))
        return mapping_node({k: _merge(children, path + (k,)) for k, children in keys.items()})
    for r, node in rest:
        if next(iter(node)) != kind or (kind not in ("list", "tuple") and _leaf_key(node) != _leaf_key(first)):
            _conflict(path, rank, first, r, node)
        if kind in ("list", "tuple") and len(node[kind]) != len(first[kind]):
            _conflict(path, rank, first, r, node)
    if kind in ("list", "tuple"):
        return {kind: [_merge([(r, n[kind][i]) for r, n in nodes], path + (i,)) for i in range(len(first[kind]))]}
    return first


def _leaf_key(node: dict) -> tuple:
    """A leaf node compared by type and repr: 1, 1.0 and True differ, and so do 0.0 and -0.0."""
    (kind, body), = node.items()
    return kind, type(body).__name__, repr(body)


def _conflict(path: KeyPath, rank_a: int, a: dict, rank_b: int, b: dict):
    raise StateDictMismatchError(
        f"state dict entry {fqn(path) or '<root>'!r} differs across ranks (rank {rank_a}: {_show(a)}, rank "
        f"{rank_b}: {_show(b)}); plain values are saved once, so all but one would be lost. Give each rank its "
        f"own key (e.g. '{fqn(path)}.rank{{r}}', which the other ranks leave out), or make them equal"
    )


def _show(node: dict) -> str:
    (kind, body), = node.items()
    if kind in ("value", "float"):
        return repr(body)[:60]
    return f"a {kind} of {len(body)}" if kind in ("list", "tuple", "dict", "map") else kind


def unflatten(skeleton: dict, tensors: Mapping[KeyPath, Any]) -> dict:
    """Rebuild the state dict that ``flatten`` described, taking each tensor from ``tensors``."""
    return _decode(skeleton, tensors)


def _decode(node: dict, tensors: Mapping[KeyPath, Any]) -> Any:
    (kind, body), = node.items()
    if kind == "tensor":
        key = tuple(body)
        if key not in tensors:
            raise KeyError(f"no tensor given for {fqn(key)!r}, which the skeleton refers to")
        return tensors[key]
    if kind in ("dict", "map"):
        return {k: _decode(v, tensors) for k, v in mapping_children(node).items()}
    if kind in ("list", "tuple"):
        seq = [_decode(v, tensors) for v in body]
        return seq if kind == "list" else tuple(seq)
    if kind == "float":
        return float(body)
    if kind == "value":
        return body
    raise CorruptCheckpointError(f"the checkpoint's state dict tree has a node of unknown kind {kind!r}: {node!r}")


def fill_plain_values(target: dict, skeleton: dict) -> None:
    """Put the saved plain values (step counters, config) into a state dict being loaded, in place.

    The target keeps its structure: its tensors are loaded elsewhere and stay the same objects; dicts and
    lists are updated in place, tuples holding tensors are rebuilt around the same tensors (a tuple cannot
    change). Dicts are filled key by key, the root as every other: the target's keys only, so keys only
    the checkpoint has are not added (another rank's per-rank entries) and keys only the target has keep
    their values (``plain_differences`` names both first). An empty dict is a placeholder: where
    neither holds a tensor it takes the saved entries, as any other entry is replaced by the saved one
    where neither holds a tensor (a list of another length too); where both are lists or tuples the walk
    descends; anything else (a saved tensor where the target has none, which ``strict=False`` reports
    as unexpected) leaves the target as it was.
    """
    _fill_entries(target, mapping_children(skeleton) or {})


def _fill_entries(value: dict, children: Mapping[str | int, dict]) -> None:
    """Fill, in place, each entry of ``value`` the checkpoint has."""
    for k in [k for k in value if k in children]:
        value[k] = _filled(value[k], children[k])


def _filled(value: Any, node: dict) -> Any:
    """``value`` with ``node``'s plain values put in (see ``fill_plain_values``)."""
    (kind, body), = node.items()
    if _filled_by_key(value, node):
        _fill_entries(value, mapping_children(node))
    elif not _has_tensor(value) and not _node_has_tensor(node):
        return _retyped(value, _decode(node, {}))
    elif kind in ("list", "tuple") and isinstance(value, (list, tuple)):
        items = [_filled(v, body[i]) if i < len(body) else v for i, v in enumerate(value)]
        if isinstance(value, list):
            value[:] = items
        elif any(new is not old for new, old in zip(items, value)):
            return _tuple_like(value, items)
    return value


def _filled_by_key(value: Any, node: dict) -> bool:
    """Whether ``fill_plain_values`` fills ``value`` key by key from ``node`` (``plain_differences``
    walks the same way): a dict facing a saved dict, unless it is an empty placeholder holding no tensor."""
    return next(iter(node)) in ("dict", "map") and isinstance(value, dict) and bool(value or _node_has_tensor(node))


def plain_differences(target: dict, skeleton: dict) -> tuple[list[KeyPath], list[KeyPath]]:
    """(missing, extra): key paths of the target's tensor-free dict entries that the checkpoint lacks,
    and of the checkpoint's that the target lacks, where ``fill_plain_values`` walks. A missing one
    keeps its value (a per-rank entry of a rank the checkpoint had not, a setting added since the
    save); an extra one is not loaded (another rank's per-rank entry, or state the target dropped).
    Tensors are matched by the load plan."""
    missing: list[KeyPath] = []
    extra: list[KeyPath] = []
    _entry_differences(target, mapping_children(skeleton) or {}, (), missing, extra)
    return missing, extra


def _entry_differences(value: dict, children: Mapping[str | int, dict], path: KeyPath, missing: list, extra: list) -> None:
    for k, v in value.items():
        if k in children:
            _differences(v, children[k], (*path, k), missing, extra)
        elif not _has_tensor(v):
            missing.append((*path, k))
    extra += [(*path, k) for k, node in children.items() if k not in value and not _node_has_tensor(node)]


def _differences(value: Any, node: dict, path: KeyPath, missing: list, extra: list) -> None:
    (kind, body), = node.items()
    if _filled_by_key(value, node):
        _entry_differences(value, mapping_children(node), path, missing, extra)
    elif kind in ("list", "tuple") and isinstance(value, (list, tuple)) and (_has_tensor(value) or _node_has_tensor(node)):
        for i, v in enumerate(value[: len(body)]):
            _differences(v, body[i], (*path, i), missing, extra)


def _retyped(old: Any, new: Any) -> Any:
    """``new``, a saved value as decoded (plain dicts, lists and tuples), in ``old``'s container types where
    ``old`` is the same kind of container: the skeleton records only dict, list and tuple, and a load gives
    back the structure it was given (a named tuple, an ``OrderedDict``, a ``torch.Size`` stay one)."""
    if isinstance(old, dict) and isinstance(new, dict):
        new = {k: _retyped(old[k], v) if k in old else v for k, v in new.items()}
        if type(old) is dict:
            return new
        out = copy.copy(old)  # keeps what the type carries (a defaultdict's factory)
        out.clear()
        out.update(new)
        return out
    if isinstance(old, list) and isinstance(new, list):
        return [_retyped(o, n) for o, n in zip(old, new)] + new[len(old):]
    if isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new):
        return _tuple_like(old, [_retyped(o, n) for o, n in zip(old, new)])
    return new


def _tuple_like(old: tuple, items: list) -> tuple:
    """``items`` as a tuple of ``old``'s type (a named tuple is built from its fields, not from a list)."""
    return type(old)._make(items) if hasattr(type(old), "_make") else type(old)(items)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return is_tensor_like(value)


def _node_has_tensor(node: dict) -> bool:
    (kind, body), = node.items()
    if kind in ("dict", "map"):
        return any(_node_has_tensor(v) for v in mapping_children(node).values())
    if kind in ("list", "tuple"):
        return any(_node_has_tensor(v) for v in body)
    return kind == "tensor"


def fqn(keypath: KeyPath) -> str:
    """A dotted display name for messages, like DCP's FQNs.

    ``("model", "layers.0.weight")`` -> ``"model.layers.0.weight"``.
    """
    return ".".join(str(c) for c in keypath)


def display_names(keys: Iterable[KeyPath]) -> dict[str, KeyPath]:
    """Dotted names for key paths (as users and DCP spell them); where two key paths share one
    (``"a.b"`` vs ``a -> b``), their node paths instead, so every name means one tensor. A node path
    taken so may be another key's dotted name (``a -> b`` becomes ``"a/b"``, the dotted name of the key
    ``"a/b"``): that key takes its node path too, until no two names agree (node paths never do)."""
    keys = list(keys)
    names = {k: fqn(k) for k in keys}
    while True:
        counts = Counter(names.values())
        clashing = [k for k in keys if counts[names[k]] > 1 and names[k] != node_path(k)]
        if not clashing:
            return {name: k for k, name in names.items()}
        names.update((k, node_path(k)) for k in clashing)


MAX_NAME_BYTES = 200
"""The longest node name a key component becomes. File systems allow 255 bytes a name, and atomic writes
add a ``.tmp-<uuid>`` suffix (37 bytes) to object names; longer encoded components get a short form."""
_HASH_CHARS = 32  # hex digits of the sha256 of the component: 128 bits, collisions out of reach
_SHORT_MARK = "~"  # never in an encoded name (it would be %7E), so short forms collide with none


def node_path(keypath: KeyPath) -> str:
    """The Zarr node path of a key path, relative to the checkpoint root: ``"model/layers.0.weight"``.

    Each component is encoded on its own and joined with ``/``: UTF-8 bytes outside ``[A-Za-z0-9._-]``
    become ``%XX`` (so ``/``, ``\\``, NUL and ``%`` itself can never act as syntax), ``.``/``..``
    become ``%2E``/``%2E%2E``, a leading ``__`` (reserved by Zarr) becomes ``%5F_``, ``zarr.json``
    (the metadata object's name) becomes ``zarr%2Ejson``, the empty string becomes ``%``, and list
    indices are decimal strings. Hence no key can climb out of the checkpoint or collide with Zarr's own
    names. An encoded component over ``MAX_NAME_BYTES`` becomes a readable prefix of it, ``~`` and a
    hash of the component (stable across runs); the root record's tree keeps the original key, so
    ``keypath_from_node`` maps it back given the tree. Not handled: case-insensitive file systems.
    """
    if not keypath:
        raise ValueError("an empty key path has no node: the root holds no tensor")
    return "/".join(_encode_component(c) for c in keypath)


def _encode_component(component: str | int) -> str:
    if isinstance(component, int) and not isinstance(component, bool):
        return str(component)
    if not isinstance(component, str):
        raise TypeError(f"key path components are str or int, got {component!r}")
    if component == "":
        return _EMPTY
    if component in _RESERVED:
        return _RESERVED[component]
    pieces = [ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in component]
    if component.startswith("__"):
        pieces[0] = "%5F"
    out = "".join(pieces)
    return out if len(out) <= MAX_NAME_BYTES else _short_form(component, pieces)


def _short_form(component: str, pieces: list[str]) -> str:
    """``<prefix of the encoded name>~<hash>``, at most ``MAX_NAME_BYTES``; the prefix ends on a whole
    character (``pieces``: the encoded characters)."""
    budget = MAX_NAME_BYTES - len(_SHORT_MARK) - _HASH_CHARS
    prefix = ""
    for piece in pieces:
        if len(prefix) + len(piece) > budget:
            break
        prefix += piece
    digest = hashlib.sha256(component.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    return f"{prefix}{_SHORT_MARK}{digest}"


def keypath_from_node(node: str, skeleton: dict | None = None) -> KeyPath:
    """Invert ``node_path``.

    A node name alone cannot tell list index ``0`` from dict key ``"0"``; given the skeleton, components
    under lists/tuples, and int keys of maps, come back as ``int``. Without it every component is a
    ``str``, and a short form (a key too long for a file name) cannot be decoded: the skeleton's dict keys
    are searched for it.
    """
    out: list[str | int] = []
    tree = skeleton
    for part in node.split("/"):
        kind = next(iter(tree)) if tree is not None else None
        if kind == "map":
            comp = _map_key(part, tree["map"], node)
        elif kind in ("list", "tuple"):
            comp = int(_decode_component(part, node))
        elif _SHORT_MARK in part and kind == "dict":
            comp = _long_key(part, tree["dict"], node)
        else:
            comp = _decode_component(part, node)
        out.append(comp)
        tree = _child(tree, kind, comp)
    return tuple(out)


def _child(tree: dict | None, kind: str | None, comp: str | int) -> dict | None:
    """The skeleton node under ``tree`` at ``comp`` (None past a leaf or an unknown key)."""
    if kind in ("list", "tuple"):
        return tree[kind][comp]
    children = mapping_children(tree) if tree is not None else None
    return None if children is None else children.get(comp)


def _map_key(part: str, pairs: list, node: str) -> str | int:
    """The key of a map node whose node name is ``part``."""
    found = [k for k, _ in pairs if _encode_component(k) == part]
    if not found:
        raise ValueError(f"node path {node!r} has {part!r}, which no key of the tree at that level has")
    return found[0]


def _long_key(part: str, keys: Mapping[str, Any], node: str) -> str:
    """The dict key whose short form ``part`` is."""
    found = next((k for k in keys if 12 * len(k) > MAX_NAME_BYTES and _encode_component(k) == part), None)
    if found is None:
        raise ValueError(f"node path {node!r} has the short form {part!r}, which no key of the tree at that level has")
    return found


def _decode_component(part: str, node: str) -> str:
    if part == _EMPTY:
        return ""
    raw = bytearray()
    i = 0
    while i < len(part):
        if part[i] in _SAFE:
            raw += part[i].encode()
            i += 1
        elif part[i] == "%" and _is_hex(part[i + 1 : i + 3]):
            raw.append(int(part[i + 1 : i + 3], 16))
            i += 3
        else:
            raise ValueError(f"node path {node!r} has {part!r}, which node_path cannot have produced")
    return raw.decode("utf-8")


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)
