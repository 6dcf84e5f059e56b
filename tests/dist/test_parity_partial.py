"""View-like and pointwise ops on ``Partial`` DTensors against torch's DTensor: placements, values and
the collectives issued. ``clone`` carries a pending reduction out first, as torch's (ours kept it
pending), so an in-place op that no Partial survives (``x.clone().abs_()``) runs as in torch instead of
raising; views, scalings and monotone ops keep the reduction pending in both. An in-place op that
torch refuses on a Partial target raises a ``RuntimeError`` in both, except ``add_``/``sub_`` of a number
on an average, max or min, which we shift (their value is then torch's out-of-place op's)."""

import math

import pytest
import torch
import torch.distributed.tensor as tdt

import dtensor

from tests.parity import assert_same, both, comm_counts
from tests.ranks import mesh, run_ranks

def _replicated(x, t: torch.Tensor):
    """``t`` as a Replicate DTensor of ``x``'s library on ``x``'s mesh (masks and indices)."""
    lib = dtensor if isinstance(x, dtensor.DTensor) else tdt
    return lib.DTensor.from_local(t, x.device_mesh, [lib.Replicate()] * x.device_mesh.ndim)


ROWS, PICKED = (torch.arange(4) % 2 == 0)[:, None], torch.tensor([1, 2])
OPS = {
    "clone": lambda x: x.clone(),
    "clone channels_last": lambda x: x[None, None].clone(memory_format=torch.channels_last),
    "clone().abs_()": lambda x: x.clone().abs_(),
    "clone().relu_()": lambda x: x.clone().relu_(),
    "clone().mul_(-2)": lambda x: x.clone().mul_(-2),
    "clone().neg_()": lambda x: x.clone().neg_(),
    "clone().zero_()": lambda x: x.clone().zero_(),
    "t": lambda x: x.t(),
    "transpose": lambda x: x.transpose(0, 1),
    "view": lambda x: x.view(2, 2, -1),
    "permute": lambda x: x.permute(1, 0),
    "unsqueeze": lambda x: x.unsqueeze(0),
    "detach": lambda x: x.detach(),
    "getitem": lambda x: x[1],
    "neg": lambda x: -x,
    "mul": lambda x: x * 3,
    "abs": lambda x: x.abs(),
    "exp": lambda x: x.exp(),
    "relu": lambda x: x.relu(),
    # monotone on their whole domain: a pending max/min stays pending
    "floor": lambda x: x.floor(),
    "ceil": lambda x: x.ceil(),
    "round": lambda x: x.round(),
    "round(decimals=1)": lambda x: x.round(decimals=1),
    "trunc": lambda x: x.trunc(),
    "sgn": lambda x: x.sgn(),
    "nan_to_num": lambda x: x.nan_to_num(),
    "expm1": lambda x: x.expm1(),
    "exp2": lambda x: x.exp2(),
    "atan": lambda x: x.atan(),
    "sinh": lambda x: x.sinh(),
    "asinh": lambda x: x.asinh(),
    "rad2deg": lambda x: x.rad2deg(),
    "hardshrink": lambda x: torch.nn.functional.hardshrink(x),
    "threshold(0, -1)": lambda x: torch.nn.functional.threshold(x, 0.0, -1.0),
    "erfc": lambda x: x.erfc(),  # decreasing: max becomes min
    "clone().floor_()": lambda x: x.clone().floor_(),
    # along some dims: a pending reduction is all-reduced first unless the op keeps it
    "cumsum(0)": lambda x: x.cumsum(0),
    "cumsum(1)": lambda x: x.cumsum(1),
    "cumprod": lambda x: x.cumprod(0),
    "logcumsumexp": lambda x: x.logcumsumexp(0),
    "cummax": lambda x: x.cummax(0),
    "cummin": lambda x: x.cummin(0),
    "sort": lambda x: x.sort(0),
    "argsort": lambda x: x.argsort(0),
    "topk": lambda x: x.topk(2, 0),
    "diagonal": lambda x: x.diagonal(),
    "tril": lambda x: x.tril(),
    "triu": lambda x: x.triu(1),
    "pad": lambda x: torch.nn.functional.pad(x, (1, 1)),
    "pad(value=1)": lambda x: torch.nn.functional.pad(x, (1, 1), value=1.0),
    "pad(value=1) of rows": lambda x: torch.nn.functional.pad(x, (0, 0, 1, 0), value=1.0),
    "flip": lambda x: x.flip(0),
    "roll": lambda x: x.roll(1, 0),
    # reductions: a pending reduction of the same kind passes, any other is carried out and the
    # reduced dims gathered
    "sum": lambda x: x.sum(),
    "sum(1)": lambda x: x.sum(1),
    "amax(1)": lambda x: x.amax(1),
    "amin(0)": lambda x: x.amin(0),
    "mean": lambda x: x.mean(),
    "mean(0)": lambda x: x.mean(0),
    "mean(1)": lambda x: x.mean(1, keepdim=True),
    # add/sub: a number is no operand, so a pending reduction is carried out first; a plain 0-d tensor is
    # a term of the reduction (counted once in a sum), on either side
    "x + 2": lambda x: x + 2,
    "x - 2.5": lambda x: x - 2.5,
    "2 + x": lambda x: 2 + x,
    "add(x, 2, alpha=3)": lambda x: torch.add(x, 2, alpha=3),
    "x + 0-d": lambda x: x + torch.tensor(2.0, dtype=torch.float64),
    "x - 0-d": lambda x: x - torch.tensor(2.0),
    "0-d + x": lambda x: torch.tensor(2.0, dtype=torch.float64) + x,
    "0-d - x": lambda x: torch.tensor(2.0, dtype=torch.float64) - x,
    "add_(0-d)": lambda x: x.add_(torch.tensor(2.0, dtype=torch.float64)),
    "add_(2)": lambda x: x.add_(2),
    "sub_(2.5)": lambda x: x.sub_(2.5),
    # masked_fill of a number: no Partial survives out of place, as torch's rule
    "masked_fill(2)": lambda x: x.masked_fill(_replicated(x, ROWS), 2.0),
    "masked_fill(0)": lambda x: x.masked_fill(_replicated(x, ROWS), 0.0),
    # index_fill: elementwise over the other dims, a number kept by avg/max/min, a 0-d tensor by all four
    "index_fill(0, 2)": lambda x: x.index_fill(0, _replicated(x, PICKED), 2.0),
    "index_fill(1, 0)": lambda x: x.index_fill(1, _replicated(x, PICKED), 0.0),
    "index_fill(1, 0-d)": lambda x: x.index_fill(1, _replicated(x, PICKED), torch.tensor(2.0, dtype=torch.float64)),
    "index_fill_(0, 2)": lambda x: x.index_fill_(0, _replicated(x, PICKED), 2.0),
    "index_fill_(1, 2)": lambda x: x.index_fill_(1, _replicated(x, PICKED), 2.0),
    "repeat_interleave(2, 0)": lambda x: x.repeat_interleave(2, 0),
    "repeat_interleave(2, 1)": lambda x: x.repeat_interleave(2, 1),
    "repeat_interleave(2)": lambda x: x.repeat_interleave(2),
}
# in place: torch refuses to change the target's placements; we shift an avg/max/min by a number
SHIFTED_IN_PLACE = {"add_(2)": "x + 2", "sub_(2.5)": "x - 2.5"}
REFUSABLE = {"index_fill_(0, 2)", "index_fill_(1, 2)", *SHIFTED_IN_PLACE}
# tril/triu keep their input's shards (each rank shifts the diagonal), where torch gathers them
WHOLE_ON_2D = {"tril", "triu"}
# flattening merges the Shard(1) of the second mesh dim into dim 0: we move it there (one all-to-all)
# and keep the result sharded, where torch replicates it; the values are compared
FLATTENED_ON_2D = {"repeat_interleave(2)"}


def _with_locals(out):
    """The result and its local shards, so that ranks holding other pieces than torch's ranks fail."""
    return out, [t.to_local() for t in (out if isinstance(out, tuple) else (out,))]


def _run(lib, op: str, reduce_op: str, mesh_shape):
    rank = torch.distributed.get_rank()
    local = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank), dtype=torch.float64) * 3
    second = lib.Replicate() if op in WHOLE_ON_2D else lib.Shard(1)
    placements = [lib.Partial(reduce_op)] + [second] * (len(mesh_shape) - 1)
    d = lib.DTensor.from_local(local, mesh(mesh_shape), placements)
    try:
        return comm_counts(lib, lambda x: _with_locals(OPS[op](x)), d)
    except RuntimeError:
        if op not in REFUSABLE:
            raise
        return "refused"


def _assert_shifted(ours, op: str, reduce_op: str, mesh_shape) -> None:
    """``op`` in place where torch refuses: the target keeps its pending reduction and gets the value of
    torch's out-of-place op."""
    (out, _), _ = ours
    (expected, _), _ = _run(tdt, SHIFTED_IN_PLACE[op], reduce_op, mesh_shape)
    assert out.placements[0] == dtensor.Partial(reduce_op), (op, reduce_op, out.placements)
    assert torch.allclose(out.full_tensor(), expected.full_tensor(), atol=1e-12, rtol=0), (op, reduce_op)


def _case(mesh_shape):
    for reduce_op in ("sum", "avg", "max", "min"):
        for op in OPS:
            ours, theirs = both(_run, op, reduce_op, mesh_shape)
            if op in SHIFTED_IN_PLACE and reduce_op != "sum":
                assert theirs == "refused", (op, reduce_op, theirs)
                _assert_shifted(ours, op, reduce_op, mesh_shape)
                continue
            if op in FLATTENED_ON_2D and len(mesh_shape) == 2:
                ours, theirs = ours[0][0].full_tensor(), theirs[0][0].full_tensor()
            assert_same(ours, theirs, atol=1e-12, what=f"{op} of a Partial({reduce_op}) DTensor on {mesh_shape}")
    return True


@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)])
def test_ops_on_partial_dtensors_match_torch(mesh_shape):
    assert all(run_ranks(math.prod(mesh_shape), _case, mesh_shape))
