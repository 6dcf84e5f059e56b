"""The matrix-product and reduction rules as pure functions: no processes, a stand-in mesh."""


import torch

from dtensor.ops import matrix, reductions
from dtensor.ops.common import redistribute_cost
from dtensor.placements import Partial, Replicate, Shard
from dtensor.spec import DTensorSpec
from tests.fakes import FakeMesh

R, P, S0, S1 = Replicate(), Partial(), Shard(0), Shard(1)
aten = torch.ops.aten


def _spec(shape, placements, mesh=(4,)):
    return DTensorSpec.create(FakeMesh(mesh), placements, shape, torch.float32)


def _mm(*specs, op=aten.mm.default):
    strategy = matrix.RULES[op](op, list(specs), (), {})
    return strategy.inputs, strategy.output


def test_mm_options_are_the_einsum_cases():
    options = matrix._options("mk,kn->mn")
    assert (R, R, R) == options[0]
    assert (P, S1, S0) in options  # contraction
    assert (S0, S0, R) in options and (S1, R, S1) in options  # free dims
    assert (P, P, R) in options and (P, R, P) in options  # linearity


def test_tensor_parallel_layouts_need_no_redistribution():
    x, w_col, w_row = _spec((8, 16), [R]), _spec((16, 32), [S1]), _spec((16, 32), [S0])
    assert _mm(x, w_col) == (((R,), (S1,)), (S1,))
    assert _mm(_spec((8, 16), [S1]), w_row) == (((S1,), (S0,)), (P,))


def test_addmm_bias_follows_the_output():
    bias = _spec((32,), [R])
    inputs, out = _mm(bias, _spec((8, 16), [S1]), _spec((16, 32), [S0]), op=aten.addmm.default)
    assert out == (P,) and inputs[0] == (P,)  # the bias is split into shares that sum to it
    inputs, out = _mm(_spec((32,), [S0]), _spec((8, 16), [R]), _spec((16, 32), [S1]), op=aten.addmm.default)
    assert out == (S1,) and inputs == ((S0,), (R,), (S1,))


def test_cost_prefers_one_gather_of_the_smaller_operand():
    # both sharded on rows: gather the small weight (lhs-free) rather than all-to-all the activations
    inputs, out = _mm(_spec((4096, 16), [S0]), _spec((16, 32), [S0]))
    assert out == (S0,) and inputs == ((S0,), (R,))


def test_no_strategy_makes_empty_shards():
    inputs, out = _mm(_spec((8, 16), [R]), _spec((16, 2), [R]))  # 2 columns cannot be cut in 4
    assert out == (R,)


def test_redistribute_cost_orders_collectives():
    spec = _spec((64, 64), [S0])
    assert redistribute_cost(spec, (S0,)) == 0
    assert redistribute_cost(_spec((64, 64), [R]), (S1,)) == 0
    gather = redistribute_cost(spec, (R,))
    assert 0 < gather < redistribute_cost(spec, (S1,))  # torch's all-to-all penalty
    assert redistribute_cost(spec, (P,)) == float("inf")


def _reduce(op, spec, *args, **kwargs):
    strategy = reductions.RULES[op](op, [spec], (None, *args), kwargs)
    return strategy.inputs[0], strategy.output


def test_reduction_layouts():
    spec = _spec((8, 6, 4), [S1], mesh=(2,))
    assert _reduce(aten.sum.dim_IntList, spec, [1]) == ((S1,), (P,))
    assert _reduce(aten.sum.dim_IntList, spec, [0]) == ((S1,), (S0,))  # renumbered
    assert _reduce(aten.sum.dim_IntList, spec, [0], True) == ((S1,), (S1,))
    assert _reduce(aten.amax.default, spec, [1, 2]) == ((S1,), (Partial("max"),))
    assert _reduce(aten.argmax.default, spec, 1) == ((R,), (R,))
    assert _reduce(aten.logsumexp.default, spec, [2], True) == ((S1,), (S1,))
    assert _reduce(aten.logsumexp.default, spec, [1]) == ((R,), (R,))
    partial = _spec((8, 6, 4), [P], mesh=(2,))
    assert _reduce(aten.sum.default, partial) == ((P,), (P,))
    assert _reduce(aten.amax.default, partial, [0]) == ((R,), (R,))


def test_mean_and_mismatched_partials_follow_torch():
    avg = Partial("avg")
    assert _reduce(aten.mean.dim, _spec((8, 6, 4), [S1], mesh=(2,)), [1]) == ((S1,), (avg,))
    assert _reduce(aten.mean.dim, _spec((8, 5, 4), [S1], mesh=(2,)), [1]) == ((R,), (R,))  # uneven: gathered
    assert _reduce(aten.mean.default, _spec((8, 6), [avg], mesh=(2,))) == ((avg,), (avg,))
    assert _reduce(aten.mean.default, _spec((8, 6), [P], mesh=(2,))) == ((R,), (R,))
    # a pending reduction of another kind is carried out, and the reduced dims gathered too
    assert _reduce(aten.sum.dim_IntList, _spec((8, 6), [Partial("max"), S1], mesh=(2, 2)), [1]) == ((R, R), (R, R))
    assert _reduce(aten.sum.dim_IntList, _spec((8, 6), [P, S1], mesh=(2, 2)), [1]) == ((P, S1), (P, P))
