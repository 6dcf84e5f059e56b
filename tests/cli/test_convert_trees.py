"""``convert`` keeps whole state dicts (nesting, int keys, plain values) between zarr, dcp and torch, on
checkpoints written by ``torch.save`` and ``torch.distributed.checkpoint.save`` themselves; safetensors
names what it cannot hold; DCP and torch.save sources and targets may be fsspec URLs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import uuid
import warnings

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import shardstore
from shardstore.convert.sources import ZarrSource
from shardstore.flatten import unflatten
from tests.cli.helpers import cli, cli_json, run_script


def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(8, 3, generator=g), "layers": [torch.arange(4), {"b": torch.randn(5, generator=g).to(torch.bfloat16)}]},
        "optim": {"state": {0: {"exp_avg": torch.randn(8, 3, generator=g), "step": torch.tensor(3.0)},
                            1: {"exp_avg": torch.tensor([float("nan"), -0.0]), "step": torch.tensor(3.0)}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1], "nesterov": False, "foreach": None}]},
        "step": 7, "loss": float("nan"), "name": "run-1", "sizes": [], "flags": {"done": True},
        "pair": (torch.ones(2, dtype=torch.float16), 3),  # DCP pickles a tuple whole, tensor and all
    }


def _same(a, b, path: str = "") -> None:
    """Equal in structure, types and bits (tensors bit for bit, NaN equal to NaN, -0.0 not equal to 0.0)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b) or set(a) == set(b), (path, list(a), list(b))
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}.{i}")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    else:
        assert a == b, path


def _str_keys(value):
    """What DCP's format makes of a state dict: every dict key a string."""
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value


def _blank(value):
    """The same structure with zeroed tensors and every plain leaf (or list/tuple of them) None: a target
    for DCP's own load, which fills it in."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list) and any(isinstance(v, (dict, torch.Tensor)) for v in value):
        return [_blank(v) for v in value]
    return None


def _zarr_state(url: str) -> dict:
    """The state dict of a shardstore checkpoint, read back whole (tree and tensors)."""
    source = ZarrSource(url)
    return unflatten(source.tree(), {key: source.read(name) for name, key in source.key_paths.items()})


def test_torch_save_to_zarr_to_torch_keeps_everything_bit_exact(capsys, tmp_path):
    torch.save(_state(), tmp_path / "state.pt")
    code, doc = cli_json(capsys, "convert", tmp_path / "state.pt", tmp_path / "z", "--to", "zarr")
    assert code == 0 and doc["tensors"] == 8 and doc["dropped"] == []
    _same(_zarr_state(str(tmp_path / "z")), _state())  # int keys, tuples, NaN, bf16 and all
    assert cli(capsys, "verify", tmp_path / "z")[0] == 0
    assert cli(capsys, "convert", tmp_path / "z", tmp_path / "back.pt", "--to", "torch")[0] == 0
    _same(torch.load(tmp_path / "back.pt", weights_only=True), _state())
    target = {"model": {"w": torch.zeros(8, 3), "layers": [torch.zeros(4, dtype=torch.int64), {"b": torch.zeros(5, dtype=torch.bfloat16)}]},
              "optim": {"state": {0: {"exp_avg": torch.zeros(8, 3), "step": torch.zeros(())},
                                  1: {"exp_avg": torch.zeros(2), "step": torch.zeros(())}}, "param_groups": []},
              "step": 0, "loss": 0.0, "name": "", "sizes": [1], "flags": {}, "pair": (torch.zeros(2, dtype=torch.float16), 0)}
    shardstore.load(target, str(tmp_path / "z"))  # a converted checkpoint loads into the same structure
    _same(target, _state())


def test_dcp_written_by_torch_converts_as_dcp_itself_reads_it(capsys, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), checkpoint_id=str(tmp_path / "dcp"))
        dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "oracle.pt"))  # DCP's own reading of it
    oracle = torch.load(tmp_path / "oracle.pt", weights_only=True)
    _same(oracle, _str_keys(_state()))  # DCP's format keeps dict keys as strings
    code, doc = cli_json(capsys, "convert", tmp_path / "dcp", tmp_path / "z", "--to", "zarr")
    assert code == 0 and doc["tensors"] == 8
    _same(_zarr_state(str(tmp_path / "z")), oracle)
    assert cli(capsys, "convert", tmp_path / "dcp", tmp_path / "out.pt", "--to", "torch")[0] == 0
    _same(torch.load(tmp_path / "out.pt", weights_only=True), oracle)


def test_zarr_to_dcp_to_zarr_keeps_the_tree(capsys, tmp_path):
    zarr, d, back = str(tmp_path / "z"), tmp_path / "dcp", str(tmp_path / "back")
    shardstore.save(_state(), zarr)
    code, doc = cli_json(capsys, "convert", zarr, d, "--to", "dcp")
    assert code == 0 and doc["dropped"] == [] and doc["str_keys"] == ["optim.state.0", "optim.state.1"]
    code, _, err = cli(capsys, "convert", zarr, tmp_path / "dcp2", "--to", "dcp")
    assert code == 0 and "warning: dcp stores dict keys as strings: the int keys of optim.state.0, optim.state.1 read back as str" in err
    loaded = _blank(_state())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(d))  # read by DCP itself into the original structure
    _same(loaded, _state())
    assert cli(capsys, "convert", d, back, "--to", "zarr")[0] == 0
    _same(_zarr_state(back), _str_keys(_state()))


def test_safetensors_names_what_it_drops(capsys, tmp_path):
    torch.save(_state(), tmp_path / "state.pt")
    out = tmp_path / "m.safetensors"
    code, text, err = cli(capsys, "convert", tmp_path / "state.pt", out, "--to", "safetensors")
    dropped = ["optim.param_groups.0.lr", "optim.param_groups.0.betas.0", "optim.param_groups.0.betas.1",
               "optim.param_groups.0.params.0", "optim.param_groups.0.params.1", "optim.param_groups.0.nesterov",
               "optim.param_groups.0.foreach", "step", "loss", "name", "sizes", "flags.done", "pair.1"]
    assert code == 0 and "wrote 8 tensors" in text
    assert f"warning: safetensors cannot hold 13 non-tensor entries of {tmp_path / 'state.pt'}, left out: " \
           f"{', '.join(dropped)}; convert to zarr or torch to keep them" in err
    assert cli_json(capsys, "convert", tmp_path / "state.pt", tmp_path / "d", "--to", "safetensors")[1]["dropped"] == dropped
    tensors = load_file(str(out))
    assert sorted(tensors) == ["model.layers.0", "model.layers.1.b", "model.w", "optim.state.0.exp_avg",
                               "optim.state.0.step", "optim.state.1.exp_avg", "optim.state.1.step", "pair.0"]
    _same(tensors["optim.state.1.exp_avg"], _state()["optim"]["state"][1]["exp_avg"])


def test_dcp_empty_dicts_are_reported_as_dropped(capsys, tmp_path):
    torch.save({"w": torch.ones(2), "optim": {"state": {}}}, tmp_path / "s.pt")
    code, doc = cli_json(capsys, "convert", tmp_path / "s.pt", tmp_path / "dcp", "--to", "dcp")
    assert code == 0 and doc["dropped"] == ["optim.state"]


class Opaque:
    """A value DCP pickles that ``weights_only=True`` refuses to unpickle."""


def test_dcp_pickled_code_is_refused(capsys, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "obj": Opaque()}, checkpoint_id=str(tmp_path / "dcp"))
    code, _, err = cli(capsys, "convert", tmp_path / "dcp", tmp_path / "z", "--to", "zarr")
    assert code == 2 and f"torch DCP checkpoint {tmp_path / 'dcp'}: entry 'obj' holds an object " \
                          "torch.load(weights_only=True) refuses" in err and "shardstore does not run pickled code" in err
    assert not (tmp_path / "z").exists()


class RunsCode:
    """A pickle that runs code when unpickled: a ``.metadata`` file no DCP save writes."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _dcp_with_metadata(tmp_path, edit) -> str:
    """A DCP directory saved by torch, its ``.metadata`` pickle then replaced by ``edit(metadata)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "step": 3}, checkpoint_id=str(tmp_path / "dcp"))
    path = tmp_path / "dcp" / ".metadata"
    path.write_bytes(pickle.dumps(edit(pickle.loads(path.read_bytes()))))
    return str(tmp_path / "dcp")


def _relocated(metadata, relative_path: str):
    metadata.storage_data = {k: dataclasses.replace(v, relative_path=relative_path) for k, v in metadata.storage_data.items()}
    return metadata


def test_a_dcp_metadata_pickle_is_never_run_and_names_no_file_outside(capsys, tmp_path):
    marker = tmp_path / "ran"
    src = _dcp_with_metadata(tmp_path, lambda m: RunsCode(marker))
    for argv in (("convert", src, tmp_path / "z", "--to", "zarr"), ("diff", src, src)):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "its .metadata file cannot be read as DCP metadata" in err and "posix.mkdir" in err, err
        assert not marker.exists() and not (tmp_path / "z").exists()
    (tmp_path / "outside").mkdir()
    torch.save(torch.ones(2), tmp_path / "outside" / "data")
    for path, says in (("../outside/data", "'..' component"), (str(tmp_path / "outside" / "data"), "absolute"),
                       ("link", "a symbolic link")):
        shutil.rmtree(tmp_path / "dcp")
        src = _dcp_with_metadata(tmp_path, lambda m: _relocated(m, path))
        os.symlink(tmp_path / "outside" / "data", tmp_path / "dcp" / "link")
        code, _, err = cli(capsys, "convert", src, tmp_path / "z", "--to", "zarr")
        assert code == 2 and says in err and not (tmp_path / "z").exists(), err


def test_a_torch_save_file_pickling_code_is_refused_naming_what_it_would_run(capsys, tmp_path):
    """torch words the refusal of a blocked module's function ("unsupported GLOBAL posix.mkdir whose
    module posix is blocked") otherwise than that of a class it does not allow: the message fell back to
    torch's first line, which advises re-running with weights_only=False."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": RunsCode(marker)}, tmp_path / "s.pt")
    code, _, err = cli(capsys, "convert", tmp_path / "s.pt", tmp_path / "z", "--to", "zarr")
    assert code == 2 and "(it pickles posix.mkdir)" in err and "weights_only` set to `False`" not in err, err
    assert not marker.exists() and not (tmp_path / "z").exists()


def test_torch_file_with_unsupported_values_is_refused(capsys, tmp_path):
    torch.save({"w": torch.ones(2), "dtype": torch.float16}, tmp_path / "s.pt")
    code, _, err = cli(capsys, "convert", tmp_path / "s.pt", tmp_path / "z", "--to", "zarr")
    assert code == 2 and f"torch.save file {tmp_path / 's.pt'}: state dict entry 'dtype' is a dtype" in err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    code, _, err = cli(capsys, "convert", tmp_path / "junk.pt", tmp_path / "z", "--to", "zarr")
    assert code == 2 and f"torch.save file {tmp_path / 'junk.pt'} cannot be read with torch.load(weights_only=True)" in err
    assert not (tmp_path / "z").exists()


def test_dcp_and_torch_save_on_fsspec_urls(capsys, tmp_path):
    base = f"memory://convert-{uuid.uuid4().hex}"
    torch.save(_state(), tmp_path / "state.pt")
    fs = fsspec.filesystem("memory")
    fs.put_file(str(tmp_path / "state.pt"), f"{base}/state.pt")
    assert cli(capsys, "convert", f"{base}/state.pt", f"{base}/dcp", "--to", "dcp")[0] == 0
    assert fs.exists(f"{base}/dcp/.metadata") and not (tmp_path / "dcp").exists()
    assert cli(capsys, "convert", f"{base}/dcp", f"{base}/out.pt", "--to", "torch")[0] == 0
    with fs.open(f"{base}/out.pt", "rb") as f:
        _same(torch.load(f, weights_only=True), _str_keys(_state()))
    assert cli(capsys, "convert", f"{base}/state.pt", f"{base}/z", "--to", "zarr")[0] == 0
    _same(_zarr_state(f"{base}/z"), _state())
    assert cli(capsys, "diff", f"{base}/dcp", tmp_path / "state.pt")[0] == 0


def test_console_script_converts_dcp_and_torch_save_files(capsys, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), checkpoint_id=str(tmp_path / "dcp"))
    torch.save(_state(), tmp_path / "state.pt")
    done = run_script("convert", tmp_path / "dcp", tmp_path / "z", "--to", "zarr", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["tensors"] == 8, done.stderr
    done = run_script("convert", tmp_path / "state.pt", tmp_path / "m.safetensors", "--to", "safetensors")
    assert done.returncode == 0 and "warning: safetensors cannot hold 13 non-tensor entries" in done.stderr
    assert cli(capsys, "diff", tmp_path / "z", tmp_path / "m.safetensors")[0] == 0
    _same(_zarr_state(str(tmp_path / "z")), _str_keys(_state()))


def test_diff_compares_plain_values_where_both_formats_hold_them(capsys, tmp_path):
    changed = _state()
    changed["step"], changed["optim"]["param_groups"][0]["lr"] = 8, 0.2
    del changed["name"]
    changed["flags"]["extra"] = 1.0
    torch.save(_state(), tmp_path / "a.pt")
    torch.save(changed, tmp_path / "b.pt")
    code, out, _ = cli(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 1 and out.splitlines() == [
        "optim.param_groups.0.lr: value differs: A 0.1, B 0.2", "step: value differs: A 7, B 8",
        "name: only in A (a value: 'run-1')", "flags.extra: only in B (a value: 1.0)",
        "8 of 8 tensors are the same; 4 plain value(s) differ"]
    code, doc = cli_json(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 1 and not doc["same"] and doc["values"][1] == {"key": "step", "status": "value", "a": "7", "b": "8"}
    assert cli(capsys, "convert", tmp_path / "a.pt", tmp_path / "a.safetensors", "--to", "safetensors")[0] == 0
    assert cli(capsys, "diff", tmp_path / "a.pt", tmp_path / "a.safetensors")[0] == 0  # safetensors holds no values
