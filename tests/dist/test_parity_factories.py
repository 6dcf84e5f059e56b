"""Factories and conversion against torch's DTensor: ``full`` takes its fill value's dtype, every
factory takes torch's keywords and refuses what torch refuses, and ``from_torch`` refuses torch's
Partial subclasses it would misread (tests/parity.py runs each scenario on both)."""

import pytest
import torch
import torch.distributed.tensor as tdt

import dtensor
from tests.parity import assert_same, both, placement_names, raised, run_without_fallback
from tests.ranks import mesh


# ---------------------------------------------------------------- factories


def _full_dtypes(lib):
    """``full`` without ``dtype`` takes the fill value's dtype, as ``torch.full`` (ours was float32)."""
    m = mesh((2, 2))
    return [
        lib.full((5, 3), value, device_mesh=m, placements=[lib.Shard(0), lib.Shard(1)])
        for value in (2, True, 2.5, 1 + 2j)
    ] + [lib.full((5,), 2, dtype=torch.float64, device_mesh=m)]


def _full_case():
    ours, theirs = both(_full_dtypes)
    assert_same(ours, theirs, what="full(size, fill_value)")
    return [t.dtype for t in ours]


def test_full_takes_the_fill_values_dtype_like_torch():
    expected = [torch.int64, torch.bool, torch.float32, torch.complex64, torch.float64]
    assert run_without_fallback(_full_case, world=4) == [expected] * 4


def _factory_calls(lib):
    """Every factory with torch's keyword arguments: ``requires_grad``, ``dtype``, empty ``placements``
    (Replicate, as torch's), ``placements`` on a 2-D mesh; and the calls torch refuses, by error type: a
    layout other than strided (ours ignored it and made a strided tensor), no mesh (ours: ValueError)."""
    m = mesh((2, 2))
    out, errors = [], []
    for name in ("zeros", "ones", "empty", "full"):
        f = getattr(lib, name)
        make = (lambda *size, **kw: f(size, 3.0, **kw)) if name == "full" else f  # noqa: B023
        made = [
            make(5, 3, requires_grad=True, device_mesh=m, placements=[lib.Shard(0), lib.Shard(1)]),
            make(4, 2, dtype=torch.float64, device_mesh=m, placements=(lib.Replicate(), lib.Shard(1))),
            make(4, 2, dtype=torch.int32, device_mesh=m, placements=[]),
            make(4, 2, layout=torch.strided, device_mesh=m),
        ]
        if name == "empty":  # uninitialized: compare everything but the values
            made = [(tuple(d.shape), tuple(d.stride()), d.dtype, placement_names(d.placements)) for d in made]
        out.append((made, [(d.requires_grad, d.is_leaf) for d in made if not isinstance(d, tuple)]))
        for layout in (torch.sparse_coo, torch.sparse_csr, torch._mkldnn):
            errors.append(raised(lambda: make(4, 2, layout=layout, device_mesh=m)))  # noqa: B023
        errors.append(raised(lambda: make(4, 2)))  # noqa: B023
    return out, errors


def _factories_case():
    ours, theirs = both(_factory_calls)
    assert_same(ours[0], theirs[0], what="factories")
    for mine, torchs in zip(ours[1], theirs[1]):
        assert isinstance(mine, type(torchs)), f"{mine!r} is not a {type(torchs).__name__} like torch's {torchs!r}"
    assert "layout value not supported!" in str(ours[1][0]) and "needs a device_mesh" in str(ours[1][3])
    return True


def test_factories_take_torchs_keywords_and_refuse_what_torch_refuses():
    assert all(run_without_fallback(_factories_case, world=4))


# ---------------------------------------------------------------- conversion from torch's DTensor


def _converted_norms():
    """torch's norm of a sharded DTensor is pending in a Partial subclass (partial 2-norms are combined as
    a root of summed squares, not summed): converting it must refuse, not give the sum of the norms."""
    m = mesh((2,))
    theirs = tdt.distribute_tensor(torch.arange(1.0, 13.0).reshape(3, 4), m, [tdt.Shard(1)])
    norm = torch.linalg.vector_norm(theirs)
    with pytest.raises(ValueError, match="only plain Shard/Replicate/Partial are supported; redistribute"):
        dtensor.from_torch(norm)
    pending = dtensor.from_torch(tdt.DTensor.from_local(torch.ones(2), m, [tdt.Partial("max")]))
    replicated = dtensor.from_torch(norm.redistribute(m, [tdt.Replicate()]))
    return placement_names(pending.placements), replicated.full_tensor()


def test_from_torch_refuses_torchs_partial_subclasses_it_would_misread():
    expected = torch.linalg.vector_norm(torch.arange(1.0, 13.0))
    for placements, norm in run_without_fallback(_converted_norms):
        assert placements == ("Partial(max)",)
        assert torch.allclose(norm, expected)
