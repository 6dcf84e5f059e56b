"""flatten/unflatten round trips and the key <-> node-name mapping, including hostile keys."""

import json
import math
import posixpath
from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch

from shardstore.errors import CorruptCheckpointError, StateDictMismatchError
from shardstore.flatten import (
    display_names, fill_plain_values, flatten, fqn, is_tensor_like, keypath_from_node, merge_skeletons, plain_differences,
    node_path, unflatten,
)

HOSTILE = ["..", ".", "/etc/passwd", "a/../../b", "\\", "..\\..\\x", "\x00", "", "é", "日本", "__x", "__",
           "zarr.json", "%", "%2E", "a b", "~", "c", "-", "___"]


class Hooked:
    """Just enough of a DTensor-like object for flatten: it has DCP's write hook."""

    def __create_write_items__(self, fqn, obj):
        return []


def round_trip(sd):
    items, skeleton = flatten(sd)
    return unflatten(json.loads(json.dumps(skeleton, allow_nan=False)), items), items


def test_round_trip_keeps_structure_and_plain_values():
    w, b = torch.ones(2, 3), torch.zeros(())
    sd = {"model": {"layers.0.weight": w, "b": b}, "opt": {"param_groups": [{"lr": 0.1, "params": ["a", "b"],
          "betas": (0.9, 0.99), "nesterov": False, "foreach": None}]}, "step": 7, "name": "run", "empty": {}, "nil": []}
    back, items = round_trip(sd)
    assert back == {**sd, "model": back["model"]}
    assert back["model"]["layers.0.weight"] is w and back["model"]["b"] is b
    assert isinstance(back["opt"]["param_groups"][0]["betas"], tuple)
    assert set(items) == {("model", "layers.0.weight"), ("model", "b")}


def test_items_hold_tensors_only_with_list_indices_as_ints():
    t = torch.ones(1)
    items, skeleton = flatten({"xs": [t, 3, {"y": t}]})
    assert set(items) == {("xs", 0), ("xs", 2, "y")}
    assert skeleton["dict"]["xs"]["list"][0] == {"tensor": ["xs", 0]}


def test_non_finite_floats_survive_strict_json():
    back, _ = round_trip({"a": math.inf, "b": -math.inf, "c": math.nan, "d": 1.5})
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"]) and back["d"] == 1.5


def test_mappings_and_tuple_subclasses_come_back_plain():
    back, _ = round_trip({"od": OrderedDict(x=1), "size": torch.Size([2, 3])})
    assert type(back["od"]) is dict and back["size"] == (2, 3) and type(back["size"]) is tuple


def test_a_load_keeps_the_targets_container_types():
    """The skeleton records only dict, list and tuple; filled into a state dict, saved values take its types,
    nested ones too, a defaultdict keeping its factory; a saved value of another kind replaces the entry."""
    pair = namedtuple("pair", "a b")
    target = {"d": defaultdict(list, a=[pair(0, 0)]), "size": torch.Size([0]), "t": (0, 0), "swap": (0,)}
    fill_plain_values(target, flatten({"d": {"a": [(1, 2)]}, "size": (4,), "t": (1, 2), "swap": [5]})[1])
    assert target == {"d": {"a": [(1, 2)]}, "size": (4,), "t": (1, 2), "swap": [5]}
    assert type(target["d"]) is defaultdict and target["d"].default_factory is list and type(target["d"]["a"][0]) is pair
    assert type(target["size"]) is torch.Size and type(target["swap"]) is list


def test_dicts_are_filled_with_the_targets_keys_only():
    """A dict gets the saved values of its own keys, never the checkpoint's other keys (another rank's
    per-rank entries), nested or not, holding tensors or not; the keys the checkpoint lacks keep their
    values; ``plain_differences`` names them, and the checkpoint's entries the target lacks. Lists are values: replaced whole."""
    saved = flatten({"loader": {"pos.rank0": 10, "pos.rank1": 11}, "seed.rank0": 100, "seed.rank1": 101,
                     "opt": {"lr": 0.1, "w": torch.ones(1)}, "hist": [1, 2, 3]})[1]
    target = {"loader": {"pos.rank2": -1}, "seed.rank2": -1, "opt": {"lr": 0.5, "new": 1, "w": torch.zeros(1)},
              "hist": [0], "sched": {"epoch": 0}}
    assert plain_differences(target, saved) == (
        [("loader", "pos.rank2"), ("seed.rank2",), ("opt", "new"), ("sched",)],
        [("loader", "pos.rank0"), ("loader", "pos.rank1"), ("seed.rank0",), ("seed.rank1",)],
    )
    fill_plain_values(target, saved)
    assert target["loader"] == {"pos.rank2": -1} and target["seed.rank2"] == -1 and "seed.rank0" not in target
    assert target["opt"]["lr"] == 0.1 and target["opt"]["new"] == 1 and target["hist"] == [1, 2, 3]
    placeholder = {"loader": {}}  # an empty dict takes what was saved
    assert plain_differences(placeholder, saved) == ([], [("seed.rank0",), ("seed.rank1",), ("hist",)])
    fill_plain_values(placeholder, saved)
    assert placeholder == {"loader": {"pos.rank0": 10, "pos.rank1": 11}}
    mine = {"loader": {"pos.rank1": -1}, "seed.rank1": -1}
    assert plain_differences(mine, saved) == ([], [("loader", "pos.rank0"), ("seed.rank0",), ("hist",)])
    fill_plain_values(mine, saved)
    assert mine == {"loader": {"pos.rank1": 11}, "seed.rank1": 101}


def test_display_names_never_give_two_tensors_one_name():
    """``a.b`` and ``a -> b`` share a dotted name, so both take their node paths; ``a -> b``'s, ``a/b``,
    is the dotted name of the key ``a/b``, which then takes its own node path."""
    keys = [("a.b",), ("a", "b"), ("a/b",), ("m", 0), ("m.0",), ("m/0",), ("x",)]
    names = display_names(keys)
    assert names == {"a.b": ("a.b",), "a/b": ("a", "b"), "a%2Fb": ("a/b",), "m/0": ("m", 0), "m.0": ("m.0",),
                     "m%2F0": ("m/0",), "x": ("x",)}


def test_hook_objects_are_tensors():
    assert is_tensor_like(Hooked()) and is_tensor_like(torch.zeros(1)) and not is_tensor_like([1])
    items, _ = flatten({"d": Hooked()})
    assert list(items) == [("d",)]


def test_int_keys_round_trip_as_a_map_node():
    t = torch.ones(1)
    sd = {"optim": {"state": {0: {"exp_avg": t, "step": 3}, 1: {}}, "param_groups": [{"params": [0, 1]}]}, 5: "x"}
    back, items = round_trip(sd)
    assert back == sd and back["optim"]["state"][0]["exp_avg"] is t
    assert set(items) == {("optim", "state", 0, "exp_avg")}
    _, skeleton = flatten(sd)
    assert skeleton["map"][0][0] == "optim" and skeleton["map"][1] == [5, {"value": "x"}]
    assert skeleton["map"][0][1]["dict"]["state"]["map"][0][0] == 0
    assert keypath_from_node("optim/state/0/exp_avg", skeleton) == ("optim", "state", 0, "exp_avg")
    merged = merge_skeletons([flatten({"s": {0: t}})[1], flatten({"s": {1: t}})[1]])
    assert merged == {"dict": {"s": {"map": [[0, {"tensor": ["s", 0]}], [1, {"tensor": ["s", 1]}]]}}}


def test_bad_keys_name_their_path():
    with pytest.raises(TypeError, match=r"key 0.5 under 'optim.state' is a float; keys must be str or int"):
        flatten({"optim": {"state": {0.5: {"exp_avg": torch.ones(1)}}}})
    with pytest.raises(TypeError, match=r"key True under '<root>' is a bool"):
        flatten({True: 1})
    with pytest.raises(TypeError, match=r"keys 0 and '0' under 'a' would share one node name"):
        flatten({"a": {"0": 1, 0: 2}})


def test_unsupported_leaf_names_its_path():
    with pytest.raises(TypeError, match=r"'a.1' is a bytes"):
        flatten({"a": [1, b"raw"]})
    with pytest.raises(TypeError, match="mapping"):
        flatten([torch.ones(1)])


def test_subclasses_of_plain_values_are_refused_naming_their_type():
    """An IntEnum, a str Enum or a numpy.float64 was stored as the int, str or float it subclasses and came
    back as that, its type gone; torch.save keeps it. Keys too."""
    import enum

    import numpy as np

    class Level(enum.IntEnum):
        HIGH = 2

    class Mode(str, enum.Enum):
        TRAIN = "train"

    for value, says in ((Level.HIGH, "Level"), (Mode.TRAIN, "Mode"), (np.float64(0.5), "numpy.float64")):
        with pytest.raises(TypeError, match=rf"'cfg.x' is a {says}, a subclass of (int|str|float) that would load back as"):
            flatten({"cfg": {"x": value}})
    with pytest.raises(TypeError, match=r"key <Level.HIGH: 2> under 'cfg' is a Level"):
        flatten({"cfg": {Level.HIGH: 1}})
    with pytest.raises(TypeError, match=r"'x' is a numpy.float32; .*x.item\(\)"):
        flatten({"x": np.float32(1)})


def test_what_json_cannot_carry_is_refused_naming_its_path():
    """Refused up front (before a save writes a byte), naming the entry: a key that is not valid Unicode,
    an int JSON cannot write and read back, containers nested without end (a list holding itself)."""
    with pytest.raises(TypeError, match=r"key 'w\\ud800' under 'model' is not valid Unicode"):
        flatten({"model": {"w\ud800": torch.ones(1)}})
    with pytest.raises(TypeError, match=r"'meta.seed' is an int of more than 4300 digits"):
        flatten({"meta": {"seed": 10**4300}})
    assert flatten({"meta": {"seed": -(10**4300 - 1)}})[1]  # 4300 digits are fine
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match=r"nested more than 100 containers deep \(does a list or dict hold itself\?\)"):
        flatten({"x": loop})
    deep: dict = {}
    node = deep
    for _ in range(99):
        node = node.setdefault("a", {})
    assert flatten({"deep": deep})[1]  # 100 levels are fine


def test_unflatten_reports_a_missing_tensor():
    _, skeleton = flatten({"a": {"b": torch.ones(1)}})
    with pytest.raises(KeyError, match="a.b"):
        unflatten(skeleton, {})


def test_unflatten_refuses_an_unknown_node_kind():
    with pytest.raises(CorruptCheckpointError, match="'blob'"):
        unflatten({"dict": {"a": {"blob": 1}}}, {})


def test_fqn_is_dotted():
    assert fqn(("model", "layers.0.weight")) == "model.layers.0.weight"
    assert fqn(("opt", "groups", 0, "lr")) == "opt.groups.0.lr"


def test_node_path_examples():
    assert node_path(("model", "layers.0.weight")) == "model/layers.0.weight"
    assert node_path(("xs", 3)) == "xs/3"
    assert node_path(("..", "/etc/passwd")) == "%2E%2E/%2Fetc%2Fpasswd"
    assert node_path(("__meta",)) == "%5F_meta"
    assert node_path(("",)) == "%"
    with pytest.raises(ValueError):
        node_path(())


def assert_safe(path: str, depth: int) -> None:
    parts = path.split("/")
    assert len(parts) == depth
    for part in parts:
        assert part and part not in (".", "..", "zarr.json") and not part.startswith("__")
        assert all(c.isascii() and (c.isalnum() or c in "._-%") for c in part)
    assert posixpath.normpath(path) == path and not path.startswith("/")


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_keys_stay_inside_and_round_trip(key):
    path = node_path(("a", key, "b"))
    assert_safe(path, 3)
    assert keypath_from_node(path) == ("a", key, "b")


def test_hostile_keys_are_distinct():
    paths = [node_path((k,)) for k in HOSTILE]
    assert len(set(paths)) == len(HOSTILE)


def test_keypath_from_node_uses_the_skeleton_for_list_indices():
    sd = {"xs": [torch.ones(1), {"0": torch.ones(1)}]}
    items, skeleton = flatten(sd)
    for key in items:
        assert keypath_from_node(node_path(key), skeleton) == key
    assert keypath_from_node("xs/1/0") == ("xs", "1", "0")


@pytest.mark.parametrize("bad", ["a%2", "a%zz", "a b", "a\\b", "é"])
def test_keypath_from_node_rejects_names_node_path_cannot_make(bad):
    with pytest.raises(ValueError, match="cannot have produced"):
        keypath_from_node(bad)


def test_merged_skeletons_keep_every_ranks_keys():
    _, a = flatten({"step": 3, "dl": {"rank0": {"pos": 1}}, "w": torch.zeros(1)})
    _, b = flatten({"step": 3, "dl": {"rank1": {"pos": 9}}, "w": torch.zeros(1)})
    merged = unflatten(merge_skeletons([a, b]), {("w",): "W"})
    assert merged == {"step": 3, "dl": {"rank0": {"pos": 1}, "rank1": {"pos": 9}}, "w": "W"}


@pytest.mark.parametrize(
    "a, b, says",
    [
        ({"step": 3}, {"step": 4}, r"'step' differs across ranks \(rank 0: 3, rank 1: 4\)"),
        ({"xs": [1, 2]}, {"xs": [1, 2, 3]}, r"'xs' differs across ranks \(rank 0: a list of 2, rank 1: a list of 3\)"),
        ({"x": {"a": 1}}, {"x": 5}, r"'x' differs across ranks"),
        ({"f": float("nan")}, {"f": 0.5}, r"'f' differs"),
        ({"step": 1}, {"step": True}, r"'step' differs across ranks \(rank 0: 1, rank 1: True\)"),
        ({"lr": 1}, {"lr": 1.0}, r"'lr' differs"),
    ],
)
def test_merged_skeletons_refuse_values_that_differ(a, b, says):
    with pytest.raises(StateDictMismatchError, match=says):
        merge_skeletons([flatten(a)[1], flatten(b)[1]])
