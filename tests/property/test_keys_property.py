"""Any key path maps to a node path that stays inside the checkpoint and maps back."""

import posixpath

from hypothesis import given
from hypothesis import strategies as st

from shardstore.flatten import keypath_from_node, node_path

components = st.one_of(st.text(max_size=12), st.sampled_from(["", ".", "..", "__", "__x", "zarr.json", "%", "/", "\\"]))


@given(st.lists(components, min_size=1, max_size=4))
def test_node_paths_are_safe_and_reversible(keypath):
    keypath = tuple(keypath)
    path = node_path(keypath)
    parts = path.split("/")
    assert len(parts) == len(keypath)
    for part in parts:
        assert part and part not in (".", "..", "zarr.json") and not part.startswith("__")
        assert all(c.isascii() and (c.isalnum() or c in "._-%") for c in part)
    assert posixpath.normpath(path) == path and not path.startswith("/")
    assert keypath_from_node(path) == keypath


@given(components, components)
def test_distinct_components_get_distinct_names(a, b):
    if a != b:
        assert node_path((a,)) != node_path((b,))
