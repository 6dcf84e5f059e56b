"""Interop and write balance: torch DCP saves/loads our DTensors, zarr-python reads a multi-rank
checkpoint, and replicated data is written once, spread over the ranks."""


import torch
import torch.distributed.checkpoint as dcp
import zarr

import dtensor
import shardstore
from dtensor import Replicate, Shard
from tests.ranks import device, mesh, run_ranks


def full_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(11, 6, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "e": torch.randint(0, 100, (5, 9), generator=g),
    }


def sharded(m, placements: dict, values: dict) -> dict:
    return {k: dtensor.distribute_tensor(v, m, placements[k], src_data_rank=None) for k, v in values.items()}


def _dcp_round_trip(path):
    values = full_state()
    save_layout = {"w": [Shard(0), Shard(1)], "b": [Replicate(), Shard(0)], "e": [Shard(1), Replicate()]}
    state = sharded(mesh((2, 2)), save_layout, values)
    dcp.save(state, checkpoint_id=path)
    load_layout = {"w": [Shard(1)], "b": [Replicate()], "e": [Shard(0)]}
    target = sharded(mesh((4,)), load_layout, {k: torch.zeros_like(v) for k, v in values.items()})
    before = {k: v.to_local().data_ptr() for k, v in target.items()}
    dcp.load(target, checkpoint_id=path)
    in_place = all(target[k].to_local().data_ptr() == before[k] for k in target)
    return in_place and all(torch.equal(target[k].full_tensor(), values[k]) for k in values)


def test_torch_dcp_saves_and_reshards_our_dtensors(tmp_path):
    assert all(run_ranks(4, _dcp_round_trip, str(tmp_path / "dcp")))


def _save_multi_rank(url):
    layout = {"w": [Shard(0), Replicate()], "b": [Shard(0), Shard(0)], "e": [Replicate(), Shard(1)]}
    shardstore.save(sharded(mesh((2, 3)), layout, full_state()), url)
    return True


def test_zarr_python_reads_every_tensor_of_a_multi_rank_checkpoint(tmp_path):
    url = str(tmp_path / "ckpt")
    assert all(run_ranks(6, _save_multi_rank, url))
    group = zarr.open_group(url, mode="r")
    for name, expected in full_state().items():
        array = group[name][...]
        if expected.dtype == torch.bfloat16:  # numpy has no bf16: zarr returns ml_dtypes.bfloat16
            assert str(array.dtype) == "bfloat16", name
            array = array.view("uint16")
            expected = expected.view(torch.uint16)
        got = torch.from_numpy(array)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def _save_replicated(url):
    g = torch.Generator().manual_seed(3)
    sizes = [(1000, 64), (64,), (333, 17), (4096,), (128, 128), (7, 3), (2000, 10), (1,)]
    state = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(sizes)}
    state["dt"] = dtensor.distribute_tensor(torch.randn(600, 40, generator=g), mesh((4,)), [Replicate()])
    return shardstore.save(state, url).bytes_written


def test_replicated_data_is_written_once_and_balanced(tmp_path):
    written = run_ranks(4, _save_replicated, str(tmp_path / "rep"))
    payload = (1000 * 64 + 64 + 333 * 17 + 4096 + 128 * 128 + 21 + 20000 + 1 + 600 * 40) * 4
    total = sum(written)
    assert payload <= total <= payload * 1.01  # each byte once (+ crc32c and indexes)
    assert max(written) <= 1.25 * total / 4, written


def test_zstd_compressed_checkpoint_round_trips_and_zarr_reads_it(tmp_path):
    url = str(tmp_path / "z")
    state = {"zeros": torch.zeros(300, 200), "noise": torch.randn(1000, generator=torch.Generator().manual_seed(1))}
    written = shardstore.save(state, url, compressor="zstd").bytes_written
    assert written < 300 * 200 * 4 / 10  # zeros compress
    target = {"zeros": torch.ones(300, 200), "noise": torch.zeros(1000)}
    shardstore.load(target, url)
    assert all(torch.equal(target[k], state[k]) for k in state)
    group = zarr.open_group(url, mode="r")
    assert torch.equal(torch.from_numpy(group["noise"][...]), state["noise"])



def _fsdp_tp(url: str):
    """Torch's FSDP2 over tensor parallel on a (2, 2) mesh: parameters are torch DTensors, the column-wise
    layer's with ``_StridedShard`` placements. Saved by shardstore, loaded into plain full tensors and
    back into a zeroed FSDP2 + TP model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    named = init_device_mesh(device(), (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    parallelize_module(model, named["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=named["dp"])
    placements = {k: [type(p).__name__ for p in v.placements] for k, v in model.state_dict().items()}
    shardstore.save(model.state_dict(), url)
    plain = {k: torch.zeros_like(v) for k, v in full.items()}
    shardstore.load(plain, url)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    shardstore.load(model.state_dict(), url)
    reloaded = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return (
        placements,
        all(torch.equal(plain[k], full[k].to(plain[k].device)) for k in full),
        all(torch.equal(reloaded[k], full[k].to(reloaded[k].device)) for k in full),
    )


def test_fsdp2_over_tensor_parallel_state_dict_round_trips(tmp_path):
    placements, plain_ok, reloaded_ok = run_ranks(4, _fsdp_tp, str(tmp_path / "ck"))[0]
    assert placements["0.weight"] == ["_StridedShard", "Shard"], placements
    assert plain_ok and reloaded_ok


def _torch_sub_mesh_round_trip(url):
    """torch's DTensor on a mesh of ranks 0 and 1, saved and loaded by all four ranks."""
    import torch.distributed.tensor as tdt

    full = torch.arange(35.0).reshape(7, 5)
    saved = tdt.distribute_tensor(full, mesh((2,)), [tdt.Shard(0)], src_data_rank=None)
    shardstore.save({"w": saved}, url)
    target = tdt.distribute_tensor(torch.zeros(7, 5), mesh((2,)), [tdt.Shard(1)], src_data_rank=None)
    shardstore.load({"w": target}, url)
    expected = tdt.distribute_tensor(full, mesh((2,)), [tdt.Shard(1)], src_data_rank=None)
    return torch.equal(target.to_local(), expected.to_local())


def test_torch_dtensor_on_a_sub_mesh_loads_on_every_rank(tmp_path):
    """Ranks outside the sub-mesh hold nothing of it: their (empty) chunk at offset () was planned as a
    region and the load failed with an IndexError."""
    assert run_ranks(4, _torch_sub_mesh_round_trip, str(tmp_path / "ck")) == [True] * 4
