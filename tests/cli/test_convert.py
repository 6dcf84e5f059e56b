"""``shardstore convert`` between formats, on checkpoints written by the other libraries themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import shardstore
from shardstore.convert import open_source
from shardstore.convert.safetensors import SafetensorsSource
from shardstore.diff import diff_sources
from tests.cli.helpers import cli, cli_json, run_script


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(300, 64, generator=g),
        "model.layers.0.attn.q": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.norm": torch.randn(64, generator=g).to(torch.float16),
        "counts": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(0.5, dtype=torch.float64),
        "empty": torch.empty(0, 5),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k  # bit exact


def _read_zarr(url: str) -> dict:
    ckpt = shardstore.open(url)
    return {k: ckpt.read(k) for k in ckpt.keys()}


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conv") / "model.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    return path


def test_safetensors_to_zarr_to_safetensors_is_bit_exact(capsys, hf_file, tmp_path):
    z = tmp_path / "z"
    code, out, err = cli(capsys, "convert", hf_file, z, "--to", "zarr")
    assert code == 0 and "wrote 8 tensors" in out, err
    _equal(_read_zarr(str(z)), _tensors())
    assert cli(capsys, "verify", z)[0] == 0
    back = tmp_path / "back.safetensors"
    assert cli(capsys, "convert", z, back, "--to", "safetensors")[0] == 0
    _equal(load_file(str(back)), _tensors())  # read by safetensors itself
    assert cli(capsys, "diff", hf_file, back)[0] == 0


def test_sharded_safetensors_index_as_transformers_reads_it(capsys, hf_file, tmp_path):
    out = tmp_path / "sharded"
    assert cli(capsys, "convert", hf_file, out, "--to", "safetensors", "--max-shard-size", "40000")[0] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors().values())
    merged = {}
    for f in files:
        merged.update(load_file(str(out / f)))
    _equal(merged, _tensors())
    zz = tmp_path / "from-sharded"
    assert cli(capsys, "convert", out, zz, "--to", "zarr")[0] == 0
    _equal(_read_zarr(str(zz)), _tensors())


def test_zarr_to_dcp_to_zarr_is_bit_exact(capsys, hf_file, tmp_path):
    z, d, z2 = tmp_path / "z", tmp_path / "dcp", tmp_path / "z2"
    assert cli(capsys, "convert", hf_file, z, "--to", "zarr")[0] == 0
    assert cli(capsys, "convert", z, d, "--to", "dcp")[0] == 0
    loaded = {k: torch.empty_like(v) for k, v in _tensors().items()}
    dcp.load(loaded, checkpoint_id=str(d))  # read by DCP itself
    _equal(loaded, _tensors())
    assert cli(capsys, "convert", d, z2, "--to", "zarr")[0] == 0
    _equal(_read_zarr(str(z2)), _tensors())


def test_dcp_and_torch_save_written_by_torch_convert_to_zarr(capsys, tmp_path):
    nested = {"model": {"w": torch.randn(8, 3), "layers": [torch.arange(4)]}, "step": 3}
    dcp.save(nested, checkpoint_id=str(tmp_path / "dcp"))
    torch.save(nested, tmp_path / "state.pt")
    expected = {"model.w": nested["model"]["w"], "model.layers.0": nested["model"]["layers"][0]}
    for src in ("dcp", "state.pt"):
        code, doc = cli_json(capsys, "convert", tmp_path / src, tmp_path / f"{src}.zarr", "--to", "zarr")
        assert code == 0 and doc["tensors"] == 2 and doc["dropped"] == []
        _equal(_read_zarr(str(tmp_path / f"{src}.zarr")), expected)
        assert shardstore.open(str(tmp_path / f"{src}.zarr")).state_dict_skeleton()["step"] == 3
    assert cli(capsys, "convert", tmp_path / "dcp.zarr", tmp_path / "out.pt", "--to", "torch")[0] == 0
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert back["step"] == 3 and torch.equal(back["model"]["w"], nested["model"]["w"])
    assert torch.equal(back["model"]["layers"][0], nested["model"]["layers"][0])


def test_a_legacy_torch_save_file_converts(capsys, tmp_path):
    """A non-zip torch.save file (``_use_new_zipfile_serialization=False``) cannot be mapped; it is read
    whole, still with ``weights_only``."""
    state = {"w": torch.randn(4, 3), "step": 7}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    code, _, err = cli(capsys, "convert", tmp_path / "legacy.pt", tmp_path / "z", "--to", "zarr", "--from", "torch")
    assert code == 0, err
    assert torch.equal(shardstore.open(str(tmp_path / "z")).read("w"), state["w"])


@pytest.mark.parametrize("value, says", [
    (torch.ones(3).to_sparse(), "state dict entry 'opt.x' cannot be saved: it is a sparse tensor"),
    (torch.ones(3, dtype=torch.complex32), "state dict entry 'opt.x' cannot be saved: it is of dtype torch.complex32"),
])
def test_a_torch_save_file_holding_what_no_checkpoint_holds_is_refused_before_writing(capsys, tmp_path, value, says):
    torch.save({"opt": {"x": value}, "w": torch.ones(2)}, tmp_path / "state.pt")
    code, _, err = cli(capsys, "convert", tmp_path / "state.pt", tmp_path / "z", "--to", "zarr")
    assert code == 2 and says in err and "state.pt" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "z").exists()


def test_keys_dcp_would_store_under_one_name_are_refused_before_writing(capsys, tmp_path):
    shardstore.save({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, str(tmp_path / "ck"))
    code, _, err = cli(capsys, "convert", tmp_path / "ck", tmp_path / "dcp", "--to", "dcp")
    assert code == 2 and "the keys ('a.b',) and ('a', 'b') would both be stored as 'a.b'" in err, err
    assert not (tmp_path / "dcp").exists()


def test_safetensors_reads_only_the_rows_asked_for(hf_file):
    source = SafetensorsSource(str(hf_file))
    rows = source.read("model.embed.weight", (slice(10, 20), slice(3, 5)))
    assert torch.equal(rows, _tensors()["model.embed.weight"][10:20, 3:5])


def test_convert_errors_exit_2(capsys, tmp_path):
    code, _, err = cli(capsys, "convert", tmp_path / "nothing", tmp_path / "x", "--to", "zarr")
    assert code == 2 and "no checkpoint at" in err and "name the format with --from" in err
    assert cli(capsys, "convert", tmp_path / "a", tmp_path / "b", "--to", "onnx")[0] == 2


def test_console_script_converts_in_a_subprocess(hf_file, tmp_path):
    done = run_script("convert", hf_file, tmp_path / "z", "--to", "zarr", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors"] == 8
    assert [d.status for d in diff_sources(open_source(str(hf_file)), open_source(str(tmp_path / "z")))] == ["same"] * 8


def test_a_directory_target_is_never_written_into_what_is_there(capsys, hf_file, tmp_path):
    """convert --to dcp onto its own source truncated the source's data file while reading it (a DCP
    traceback, the source unreadable); --to safetensors into a sharded directory left its index, which
    then named the old shards' values. Both are refused before anything is written."""
    src = tmp_path / "dcp"
    assert cli(capsys, "convert", hf_file, src, "--to", "dcp")[0] == 0
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    code, _, err = cli(capsys, "convert", src, src, "--to", "dcp")
    assert code == 2 and f"{src} already holds files" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    sharded = tmp_path / "hf"
    assert cli(capsys, "convert", hf_file, sharded, "--to", "safetensors", "--max-shard-size", "40000")[0] == 0
    save_file({"w": torch.ones(3)}, str(tmp_path / "other.safetensors"))
    code, _, err = cli(capsys, "convert", tmp_path / "other.safetensors", sharded, "--to", "safetensors")
    assert code == 2 and f"{sharded} already holds files" in err
    _equal({k: v for k, v in load_file(str(next(sharded.glob("model-00001-*")))).items()},
           {k: v for k, v in _tensors().items() if k in load_file(str(next(sharded.glob("model-00001-*"))))})
    assert not (sharded / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "convert", hf_file, empty, "--to", "dcp")[0] == 0  # an empty directory is fresh
    _equal({k: open_source(str(empty)).read(k) for k in _tensors()}, _tensors())


@pytest.mark.parametrize("to, name", [("torch", "state.pt"), ("dcp", "dcp"), ("safetensors", "hf")])
def test_a_convert_failing_mid_write_leaves_the_destination_as_it_was(capsys, monkeypatch, hf_file, tmp_path, to, name):
    """Output is written beside DST and renamed into place once complete: a torch.save cut short truncated
    an existing file at DST; a directory left half-written blocked the rerun."""
    dst = tmp_path / name
    if to == "torch":
        torch.save({"old": torch.ones(2)}, dst)
    before = dst.read_bytes() if dst.exists() else None
    if to == "torch":
        monkeypatch.setattr(torch, "save", _save_cut_short)
    else:
        monkeypatch.setattr(SafetensorsSource, "read", _fails_on_third_read(SafetensorsSource.read))
    code, _, err = cli(capsys, "convert", hf_file, dst, "--to", to, "--max-shard-size", "40000")
    assert code != 0
    assert (dst.read_bytes() if dst.exists() else None) == before
    assert [p.name for p in tmp_path.iterdir() if ".converting-" in p.name] == []
    monkeypatch.undo()
    assert cli(capsys, "convert", hf_file, dst, "--to", to, "--max-shard-size", "40000")[0] == 0
    _equal({k: open_source(str(dst)).read(k) for k in _tensors()}, _tensors())


def _fails_on_third_read(read):
    calls = []

    def failing(self, name, region=None):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        return read(self, name, region)

    return failing


def _save_cut_short(obj, path) -> None:
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 half a zip")
    raise OSError("disk full")


@pytest.mark.parametrize("damage", [lambda p: p.unlink(), lambda p: p.write_bytes(p.read_bytes()[:3000])])
def test_a_dcp_data_file_missing_or_cut_short_is_a_one_line_error(capsys, hf_file, tmp_path, damage):
    """DCP raises a CheckpointException (a BaseException whose message is a traceback): the command
    printed DCP's traceback and exited 1."""
    src = tmp_path / "dcp"
    assert cli(capsys, "convert", hf_file, src, "--to", "dcp")[0] == 0
    damage(next(src.glob("*.distcp")))
    for argv in (("convert", src, tmp_path / "z", "--to", "zarr"), ("diff", src, hf_file)):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and f"torch DCP checkpoint {src}: reading its data failed" in err, err
        assert len(err.strip().splitlines()) == 1
