"""Complex numbers and lazy conjugation on DTensors, against torch's DTensor: values, gradients,
placements, the conj bit, and no replicate fallback (the rotary embedding of Llama-style models)."""

import pytest
import torch

from dtensor.dispatch import fallback_ops
from tests.parity import assert_same, both
from tests.ranks import mesh, run_ranks

B, S, H, D = 2, 4, 4, 8


def _rotary(lib, x: torch.Tensor, freqs: torch.Tensor, weight: torch.Tensor):
    """Llama's rotary embedding on heads sharded over the mesh, then a weighted sum, and its gradient."""
    m = mesh((2,))
    dx = lib.distribute_tensor(x.clone().requires_grad_(), m, [lib.Shard(2)])
    df = lib.distribute_tensor(freqs, m, [lib.Replicate()])
    xc = torch.view_as_complex(dx.float().reshape(B, S, H, D // 2, 2).double())
    out = torch.view_as_real(xc * df.view(1, S, 1, D // 2)).flatten(3)
    loss = (out * lib.distribute_tensor(weight, m, [lib.Shard(2)])).sum()
    loss.backward()
    return xc.placements, out, loss, dx.grad


def _rotary_case():
    seen = set(fallback_ops)
    torch.manual_seed(0)
    x, weight = torch.randn(B, S, H, D, dtype=torch.float64), torch.randn(B, S, H, D, dtype=torch.float64)
    angles = torch.randn(S, D // 2, dtype=torch.float64)
    freqs = torch.polar(torch.ones_like(angles), angles)
    ours, theirs = both(_rotary, x, freqs, weight)
    assert_same(ours, theirs, atol=1e-12, what="rotary")
    return sorted(fallback_ops - seen)


def test_rotary_embedding_through_complex_numbers_matches_torch_and_keeps_shards():
    assert run_ranks(2, _rotary_case) == [[], []]


def _conjugation(lib, a: torch.Tensor, b: torch.Tensor):
    m = mesh((2,))
    da, db = (lib.distribute_tensor(t, m, [lib.Shard(0)]) for t in (a, b))
    c = db.conj()
    return c.is_conj(), c.placements, da * c, torch.view_as_real(c.resolve_conj()), da @ c.mT, c.full_tensor()


def _negative_bit(a: torch.Tensor):
    """``x.conj().imag`` is a lazy negative view and ``conj_physical`` a copy; torch's DTensor has no rule
    for them (``_neg_view``, ``_conj_physical``), so plain torch on full tensors is the reference here."""
    import dtensor

    da = dtensor.distribute_tensor(a, mesh((2,)), [dtensor.Shard(0)])
    imag = da.conj().imag
    assert imag.is_neg() and imag.placements == (dtensor.Shard(0),)
    assert torch.equal(imag.full_tensor(), a.conj().imag.resolve_neg())
    assert torch.equal((imag * 2).full_tensor(), a.conj().imag * 2)
    assert torch.equal(imag.resolve_neg().full_tensor(), a.conj().imag.resolve_neg())
    physical = da.conj_physical()
    assert not physical.is_conj() and physical.placements == (dtensor.Shard(0),)
    assert torch.equal(physical.full_tensor(), a.conj_physical())


def _conjugation_case():
    seen = set(fallback_ops)
    torch.manual_seed(1)
    a, b = torch.randn(4, 3, dtype=torch.complex128), torch.randn(4, 3, dtype=torch.complex128)
    ours, theirs = both(_conjugation, a, b)
    assert_same(ours, theirs, atol=1e-12, what="conjugation")
    assert torch.allclose(ours[2].full_tensor(), a * b.conj())
    _negative_bit(a)
    return sorted(fallback_ops - seen)


def test_lazy_conjugate_and_negative_bits_are_kept_like_torch():
    assert run_ranks(2, _conjugation_case) == [[], []]


def _hfftn_case(shape):
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.complex128)
    ours, theirs = both(lambda lib: torch.fft.hfftn(lib.distribute_tensor(x, mesh((2,)), [lib.Shard(0)])))
    assert torch.allclose(ours.full_tensor(), torch.fft.hfftn(x), atol=1e-10)
    assert torch.allclose(theirs.full_tensor(), torch.fft.hfftn(x), atol=1e-10)
    return True


@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 5)])
def test_hfftn_equals_torch(shape):
    assert all(run_ranks(2, _hfftn_case, shape))
