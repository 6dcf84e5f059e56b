"""The DTensor API against torch's DTensor, scenario by scenario (tests/parity.py runs each on both):
leaves that require grad, meta tensors and meta-initialised modules, ``from_local`` checks and derived
strides, ``as_strided``, one-element plain tensors, ``with mesh:``, redistribute in another dtype,
bf16 casts, sub-mesh factories, the error types torch raises for wrong layouts, plain module weights
beside DTensors and ``PrepareModuleInputOutput``. Factories and conversion: test_parity_factories.py."""

import pytest
import torch
from torch import nn

import dtensor
from tests.parity import assert_same, both, placement_names, raised, run_without_fallback
from tests.ranks import mesh


def _parallel(lib):
    if lib is dtensor:
        import dtensor.parallel as parallel
    else:
        import torch.distributed.tensor.parallel as parallel
    return parallel


# ---------------------------------------------------------------- leaves and autograd


def _leaf(lib, full: torch.Tensor):
    x = full.clone().requires_grad_()
    d = lib.distribute_tensor(x, mesh((2,)), [lib.Shard(0)])
    (d * d).sum().backward()
    return d.is_leaf, d.requires_grad, d.grad, x.grad


def _leaf_case():
    torch.manual_seed(0)
    ours, theirs = both(_leaf, torch.randn(4, 6, dtype=torch.float64))
    assert_same(ours, theirs, what="distribute_tensor(requires_grad)")
    assert ours[:2] == (True, True)
    return True


def test_distribute_tensor_of_a_tensor_that_requires_grad_is_a_leaf_that_requires_grad():
    assert all(run_without_fallback(_leaf_case))


def _partial_to_local(lib, reduce_op: str):
    """A Partial DTensor's local tensor in the graph: its gradient comes back as a Replicate one (each
    rank's local gradient is the whole gradient), as torch's; ours was a Partial one, a world-size
    multiple of torch's gradient."""
    rank = torch.distributed.get_rank()
    local = torch.arange(6.0, dtype=torch.float64).reshape(2, 3) + rank
    d = lib.DTensor.from_local(local, mesh((2,)), [lib.Partial(reduce_op)]).detach().requires_grad_()
    (d.to_local() * torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)).sum().backward()
    return d.grad


def _partial_to_local_case():
    for reduce_op in ("sum", "avg"):
        ours, theirs = both(_partial_to_local, reduce_op)
        assert_same(ours, theirs, what=f"gradient of to_local() of a Partial({reduce_op}) DTensor")
    return True


def test_to_local_of_a_partial_dtensor_gives_a_replicate_gradient_like_torch():
    assert all(run_without_fallback(_partial_to_local_case))


def _from_local_grad_placements(lib, forward: str, grad: str | None):
    """``from_local(..., grad_placements=)``: the local gradient is the DTensor's gradient moved there
    (a Partial one stays this rank's term, no all-reduce); ours refused the argument (TypeError)."""
    place = {"R": lib.Replicate(), "P": lib.Partial()}
    rank = torch.distributed.get_rank()
    local = (torch.arange(6.0, dtype=torch.float64).reshape(2, 3) + rank).requires_grad_()
    kwargs = {} if grad is None else {"grad_placements": [place[grad]]}
    d = lib.DTensor.from_local(local, mesh((2,)), [place[forward]], **kwargs)
    out = (d * 3).to_local(grad_placements=[lib.Partial()])  # a gradient that is pending a sum
    (out * (rank + 1)).sum().backward()
    return local.grad


def _from_local_grad_case():
    for forward, grad in (("R", None), ("R", "P"), ("P", "P"), ("P", None)):
        ours, theirs = both(_from_local_grad_placements, forward, grad)
        assert_same(ours, theirs, what=f"local gradient of from_local({forward}, grad_placements={grad})")
    return True


def test_from_local_takes_grad_placements_like_torch():
    assert all(run_without_fallback(_from_local_grad_case))


def _clip_mixed(lib, scalar: bool):
    """``clip_grad_norm_(foreach=True)`` over DTensor gradients and a plain one: a plain matrix is refused
    with torch's error type (ours raised AttributeError '_spec' from inside the norm); a plain 0-d one
    (a scalar parameter) counts as replicated."""
    w = lib.distribute_tensor(torch.arange(12.0, dtype=torch.float64).reshape(4, 3), mesh((2,)), [lib.Shard(0)])
    plain = torch.tensor(2.0, dtype=torch.float64) if scalar else torch.ones(3, 2, dtype=torch.float64)
    params = [torch.nn.Parameter(w), torch.nn.Parameter(plain.clone())]
    params[0].grad, params[1].grad = w.clone(), plain.clone()
    try:
        return torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), params[0].grad
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e).__name__


def _clip_mixed_case():
    for scalar in (False, True):
        ours, theirs = both(_clip_mixed, scalar)
        assert_same(ours, theirs, what=f"clip_grad_norm_ of DTensor and plain gradients (0-d: {scalar})")
    return True


def test_clip_grad_norm_over_dtensor_and_plain_gradients_acts_like_torch():
    assert all(run_without_fallback(_clip_mixed_case))


# ---------------------------------------------------------------- async results in the graph


def _async_full_tensor(lib):
    """``full_tensor()`` of an ``async_op`` redistribute, and of a layer whose parallel style
    redistributes asynchronously (RowwiseParallel keeping a DTensor output): the gradients reach the
    DTensor and the weights, as torch's do (ours were lost: None, zeros)."""
    x = torch.arange(8.0).reshape(4, 2).requires_grad_()
    d = lib.distribute_tensor(x, mesh((2,)), [lib.Shard(0)])
    (d.redistribute(mesh((2,)), [lib.Replicate()], async_op=True).full_tensor() ** 2).sum().backward()
    parallel = _parallel(lib)
    torch.manual_seed(0)
    layer = nn.Linear(4, 2, bias=False)
    parallel.parallelize_module(layer, mesh((2,)), parallel.RowwiseParallel(input_layouts=lib.Replicate(), use_local_output=False))
    (layer(torch.ones(3, 4)).full_tensor() ** 2).sum().backward()
    return d.grad.full_tensor(), layer.weight.grad.full_tensor()  # d: a leaf of its own (distribute_tensor)


def _async_case():
    ours, theirs = both(_async_full_tensor)
    assert_same(ours, theirs, what="gradients through full_tensor() of an async result")
    assert ours[0].abs().sum() > 0 and ours[1].abs().sum() > 0
    return True


def test_full_tensor_of_an_async_result_keeps_its_gradient():
    assert all(run_without_fallback(_async_case))


# ---------------------------------------------------------------- meta device


def _meta_tensor(lib):
    d = lib.distribute_tensor(torch.empty(5, 6, device="meta"), mesh((2,)), [lib.Shard(0)])
    return d.device.type, d.to_local().device.type, tuple(d.shape), tuple(d.to_local().shape), placement_names(d.placements)


def _meta_module(lib):
    """FSDP2/torchtitan initialisation: build on meta, parallelize, ``to_empty``, ``reset_parameters``."""
    parallel = _parallel(lib)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    parallel.parallelize_module(model, mesh((2,)), {"0": parallel.ColwiseParallel(), "2": parallel.RowwiseParallel()})
    on_meta = [p.device.type for p in model.parameters()]
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    layout = [(tuple(p.shape), p.device.type, tuple(p.to_local().shape), placement_names(p.placements)) for p in model.parameters()]
    return on_meta, layout, model


def _meta_case():
    ours, theirs = both(_meta_tensor)
    assert_same(ours, theirs, what="distribute_tensor(meta)")
    ours, theirs = both(_meta_module)
    assert_same(ours[:2], theirs[:2], what="meta module layout")
    model = ours[2]  # our values: initialised like nn.Linear, and the forward is the plain one
    full = [p.full_tensor() for p in model.parameters()]
    for w, fan_in in ((full[0], 6), (full[2], 8)):
        assert 0 < w.abs().max() <= fan_in ** -0.5 and w.std() > 0
    x = torch.randn(3, 6)
    plain = torch.relu(x @ full[0].T + full[1]) @ full[2].T + full[3]
    assert torch.allclose(model(x), plain, atol=1e-6)
    return True


def test_meta_tensors_stay_on_meta_and_meta_modules_initialise_after_to_empty():
    assert all(run_without_fallback(_meta_case))


# ---------------------------------------------------------------- from_local


def _from_local_strides(lib, local: torch.Tensor, mesh_shape, placements):
    d = lib.DTensor.from_local(local, mesh(mesh_shape), [lib.Shard(p) if p is not None else lib.Replicate() for p in placements])
    return tuple(d.shape), tuple(d.stride()), d.is_contiguous()


def _strides_case(mesh_shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(12):
        ndim = int(torch.randint(2, 4, (), generator=gen))
        shape = [int(s) for s in torch.randint(1, 4, (ndim,), generator=gen)]
        local = torch.randn(shape).permute(*torch.randperm(ndim, generator=gen).tolist())
        if bool(torch.randint(0, 2, (), generator=gen)):
            local = local[..., ::2]  # a gap: not dense
        placements = [int(d) if d < ndim else None for d in torch.randint(0, ndim + 1, (len(mesh_shape),), generator=gen)]
        ours, theirs = both(_from_local_strides, local, mesh_shape, placements)
        assert ours == theirs, f"local {tuple(local.shape)} strides {local.stride()} placements {placements}: {ours} vs {theirs}"
    return True


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_from_local_derives_global_strides_like_torch(mesh_shape):
    assert all(run_without_fallback(_strides_case, mesh_shape, 5, world=4))


def _from_dtensor(lib):
    d = lib.distribute_tensor(torch.ones(4, 2), mesh((2,)), [lib.Shard(0)])
    with pytest.raises(RuntimeError) as err:
        lib.DTensor.from_local(d, mesh((2,)), [lib.Shard(0)])
    return str(err.value)


def _from_dtensor_case():
    ours, _ = both(_from_dtensor)
    assert "from_local takes this rank's plain torch.Tensor, got a DTensor" in ours
    return True


def test_from_local_of_a_dtensor_raises_like_torch():
    assert all(run_without_fallback(_from_dtensor_case))


# ---------------------------------------------------------------- ops with plain and odd arguments


def _ops(lib, x: torch.Tensor):
    m = mesh((2,))
    d = lib.distribute_tensor(x, m, [lib.Shard(0)])
    same = d.as_strided(d.size(), d.stride(), d.storage_offset())
    return (
        same, same.to_local().shape, d * torch.tensor([3.0], dtype=x.dtype), d + torch.tensor([[2.0]], dtype=x.dtype),
        torch.tensor([2.0], dtype=x.dtype) - d,
    )


def _casts(lib, x: torch.Tensor):
    """bf16 training's casts: ``type_as``, ``to(device, dtype)``, ``to(non_blocking=True)``, softmax dtype=."""
    m = mesh((2,))
    d = lib.distribute_tensor(x.clone().requires_grad_(), m, [lib.Shard(0)])
    half = d.to("cpu", torch.bfloat16)
    outs = (
        half, d.float().type_as(half), d.to(torch.float32, non_blocking=True), torch.softmax(half, -1, dtype=torch.float32),
        torch.log_softmax(half, 1, dtype=torch.float64), torch.softmax(half, 0, dtype=torch.float32),
    )
    sum(o.double().sum() for o in outs).backward()
    return outs, d.grad


def _ops_case():
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert_same(*both(_ops, x), what="ops")
    assert_same(*both(_casts, x), what="casts")
    return True


def test_as_strided_one_element_tensors_and_dtype_casts_match_torch():
    assert all(run_without_fallback(_ops_case))


# ---------------------------------------------------------------- default mesh, dtypes, sub-meshes


def _default_mesh(lib):
    with mesh((2,)):
        d = lib.distribute_tensor(torch.arange(8.0).reshape(4, 2), placements=[lib.Shard(0)])
        e = lib.DTensor.from_local(torch.ones(2, 3), placements=[lib.Shard(0)])
        z = lib.zeros(4, 3)
    return d, e, z


def _redistribute_dtypes(lib, x: torch.Tensor):
    d = lib.distribute_tensor(x.clone().requires_grad_(), mesh((2,)), [lib.Shard(0)])
    r = d.redistribute(mesh((2,)), [lib.Replicate()], forward_dtype=torch.bfloat16, backward_dtype=torch.float16)
    (r.float() ** 2).sum().backward()
    return r, d.grad


def _sub_mesh(lib):
    sub = mesh((1,))  # rank 0 only
    z = lib.zeros(4, 3, device_mesh=sub, placements=[lib.Shard(0)])
    d = lib.distribute_tensor(torch.ones(4, 3), sub, [lib.Shard(0)])
    return tuple(z.to_local().shape), tuple(d.to_local().shape), tuple(z.shape)


def _mesh_case():
    torch.manual_seed(2)
    assert_same(*both(_default_mesh), what="with mesh")
    assert_same(*both(_redistribute_dtypes, torch.randn(4, 6)), what="redistribute dtypes")
    ours, theirs = both(_sub_mesh)
    assert ours == theirs, (ours, theirs)
    with pytest.raises(ValueError, match="needs a device_mesh: pass device_mesh=, or call it inside a `with mesh:` block"):
        dtensor.distribute_tensor(torch.ones(2), placements=[dtensor.Replicate()])
    return ours


def test_default_mesh_redistribute_dtypes_and_sub_mesh_factories_match_torch():
    assert run_without_fallback(_mesh_case) == [((4, 3), (4, 3), (4, 3)), ((0,), (0,), (4, 3))]


# ---------------------------------------------------------------- errors


def _errors(lib):
    parallel, m = _parallel(lib), mesh((2,))
    x = torch.ones(4, 6)
    return [
        raised(lambda: lib.distribute_tensor(x, m, [lib.Shard(0), lib.Shard(1)])),
        raised(lambda: lib.distribute_tensor(x, m, [lib.Shard(3)])),
        raised(lambda: parallel.PrepareModuleInput(input_layouts=(lib.Shard(0),), desired_input_layouts=(lib.Replicate(),) * 2)),
        raised(lambda: parallel.PrepareModuleInput(input_kwarg_layouts={"a": lib.Shard(0)}, desired_input_kwarg_layouts={})),
        raised(lambda: parallel.PrepareModuleOutput(output_layouts=(lib.Shard(0),), desired_output_layouts=(lib.Replicate(),) * 2)),
    ]


def _errors_case():
    ours, theirs = both(_errors)
    for mine, torchs in zip(ours, theirs):
        assert isinstance(mine, type(torchs)), f"{mine!r} is not a {type(torchs).__name__} like torch's {torchs!r}"
        assert isinstance(mine, ValueError), repr(mine)
    assert "`placements` must have the same length as `device_mesh.ndim`!" in str(ours[0])
    for e, phrase in zip(ours[2:], ("input_layouts", "input_kwarg_layouts", "output_layouts")):
        assert f"{phrase} and desired_{phrase} should have same length!" in str(e)
    return True


def test_layout_errors_have_torch_types_and_name_the_fix():
    assert all(run_without_fallback(_errors_case))


# ---------------------------------------------------------------- plain module weights mixed with DTensors


def _implicit(lib):
    if lib is dtensor:
        from dtensor.experimental import implicit_replication
    else:
        from torch.distributed.tensor.experimental import implicit_replication
    return implicit_replication


def _undistributed_weights(lib):
    """An embedding or batch norm left out of a plan (plain weight, DTensor input) raises the RuntimeError
    of every op, and runs replicated under implicit_replication, as torch's; ours raised AttributeError."""
    m = mesh((2,))
    tokens = lib.distribute_tensor(torch.tensor([[1, 2], [3, 0]]), m, [lib.Shard(0)])
    x = lib.distribute_tensor(torch.linspace(-2, 2, 48, dtype=torch.float64).reshape(4, 3, 4).requires_grad_(), m, [lib.Shard(0)])
    torch.manual_seed(0)
    emb, norm = nn.Embedding(5, 3, dtype=torch.float64), nn.BatchNorm1d(3, dtype=torch.float64)
    errors = [type(raised(lambda: emb(tokens))), type(raised(lambda: norm(x)))]
    with _implicit(lib)():
        out = emb(tokens).sum() + (norm(x) * torch.arange(4.0, dtype=torch.float64)).sum()
        out.backward()
    # x's gradient by value: ours keeps the batch split, torch's batch norm replicates it
    return errors, out, emb.weight.grad, norm.weight.grad, x.grad.full_tensor(), norm.running_mean, norm.running_var


def _undistributed_case():
    ours, theirs = both(_undistributed_weights)
    assert ours[0] == theirs[0] == [RuntimeError, RuntimeError], (ours[0], theirs[0])
    assert_same(ours[1:], theirs[1:], atol=1e-12, what="embedding and batch norm with plain weights")
    return True


def test_plain_embedding_and_batch_norm_weights_with_dtensor_inputs_act_like_torch():
    assert all(run_without_fallback(_undistributed_case))


# ---------------------------------------------------------------- PrepareModuleInputOutput


class _Scale(nn.Module):
    def forward(self, x, *, s):
        return x * s


def _prepare_input_output(lib):
    """One plan entry preparing a module's inputs (positional and keyword) and its output, as torch's."""
    parallel = _parallel(lib)
    local = torch.arange(12.0, dtype=torch.float64).reshape(2, 6).requires_grad_()
    style = parallel.PrepareModuleInputOutput(
        input_layouts=lib.Shard(0), desired_input_layouts=lib.Replicate(),
        input_kwarg_layouts={"s": lib.Replicate()}, desired_input_kwarg_layouts={"s": lib.Shard(0)},
        output_layouts=lib.Shard(1), desired_output_layouts=lib.Shard(0), use_local_output=False,
    )
    module = parallel.parallelize_module(_Scale(), mesh((2,)), {"": style})
    out = module(local, s=torch.linspace(1, 2, 6, dtype=torch.float64))
    out.sum().backward()
    return out, local.grad


def _prepare_input_output_case():
    ours, theirs = both(_prepare_input_output)
    assert_same(ours, theirs, what="PrepareModuleInputOutput")
    return True


def test_prepare_module_input_output_matches_torch():
    assert all(run_without_fallback(_prepare_input_output_case))
