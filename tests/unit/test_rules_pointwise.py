"""The elementwise chooser as a pure function: fake meshes, no processes."""

from __future__ import annotations


import torch

from dtensor.ops import RULES
from dtensor.ops.common import Operand, broadcast_map, elementwise, redistribute_cost
from dtensor.ops.pointwise import ADDITIVE, LINEAR, MUL
from dtensor.placements import Partial, Replicate, Shard
from dtensor.spec import DTensorSpec
from tests.fakes import FakeMesh

R, P = Replicate(), Partial()


def op(shape, *placements, mesh=(2,), dtype=torch.float64) -> Operand:
    spec = DTensorSpec.create(FakeMesh(mesh), list(placements), shape, dtype)
    return Operand(spec, tuple(shape))


def scalar() -> Operand:
    return Operand(None, ())


def test_broadcast_map_aligns_from_the_right():
    assert broadcast_map((3, 5, 4), (5, 1)) == (-1, 0, -1)
    assert broadcast_map((5, 4), (5, 4)) == (0, 1)
    assert broadcast_map((5, 4), ()) == (-1, -1)


def test_shard_on_a_broadcast_dim_cannot_stay():
    # (5, 1) sharded on its size-1 dim broadcast against (5, 4): the other operand decides
    choice = elementwise((op((5, 1), Shard(1)), op((5, 4), Shard(0))))
    assert choice.output == (Shard(0),) and choice.inputs == ((Shard(0),), (Shard(0),))


def test_output_follows_the_biggest_input():
    # (4,) broadcasts along the rows of (8, 4): gathering its 4 elements beats moving the 32
    choice = elementwise((op((4,), Shard(0)), op((8, 4), Shard(0))))
    assert choice.output == (Shard(0),) and choice.inputs == ((R,), (Shard(0),))
    flipped = elementwise((op((8, 4), Shard(1)), op((4,), R)))
    assert flipped.output == (Shard(1),) and flipped.inputs == ((Shard(1),), (Shard(0),))


def test_replicate_and_scalar_operands_join_a_sharded_one_for_free():
    choice = elementwise((op((5, 4), R), op((5, 4), Shard(1)), scalar()))
    assert choice == type(choice)(((Shard(1),), (Shard(1),), None), (Shard(1),))
    zero_d = elementwise((op((5, 4), Shard(0), Shard(1), mesh=(2, 2)), op((), R, R, mesh=(2, 2))))
    assert zero_d.output == (Shard(0), Shard(1)) and zero_d.inputs[1] == (R, R)


def test_partial_rules():
    assert elementwise((op((4,), P), op((4,), P)), ADDITIVE).output == (P,)
    assert elementwise((op((4,), P),), LINEAR).output == (P,)  # mul by a Python number
    assert elementwise((op((4,), P), op((4,), R)), MUL).output == (P,)
    p_times_p = elementwise((op((4,), P), op((4,), P)), MUL)
    assert p_times_p.output == (P,) and p_times_p.inputs[1] == (R,)  # one side reduced first
    assert elementwise((op((4,), P),)).output == (R,)  # non-linear: reduce


def test_no_shard_options_when_nothing_is_sharded():
    # torch only considers Shard layouts when some input is sharded: P -> R, not a reduce-scatter
    assert elementwise((op((8,), P),)).output == (R,)


def test_inplace_keeps_target_or_fails():
    target, other = op((5, 4), Shard(0)), op((5, 4), Shard(1))
    assert elementwise((target, other), (), (0,)).inputs == ((Shard(0),), (Shard(0),))
    assert elementwise((op((5, 4), P), op((5, 4), R)), (), (0,)) is None
    uneven = elementwise((op((3, 4), Shard(0), mesh=(4,)), op((3, 4), Shard(1), mesh=(4,))), (), (0,))
    assert uneven.output == (Shard(0),)  # 3 rows on 4 ranks: torch refuses, the target forces it


def test_redistribute_cost_prefers_local_moves():
    spec = op((8, 8), Shard(0), R, mesh=(2, 2)).spec
    assert redistribute_cost(spec, (Shard(0), R)) == 0
    assert redistribute_cost(spec, (Shard(0), Shard(1))) == 0  # a local chunk
    assert 0 < redistribute_cost(spec, (R, Shard(1))) < redistribute_cost(spec, (R, R))
    assert redistribute_cost(spec, (Partial(), R)) == float("inf")


def test_foreach_rule_chooses_per_element():
    from dtensor import DTensor

    def dt(shape, placement):
        spec = op(shape, placement).spec
        return DTensor(torch.empty(shape, device="meta", dtype=spec.dtype), spec)

    xs, ys = [dt((4,), Shard(0)), dt((3, 2), R)], [dt((4,), R), dt((3, 2), Shard(1))]
    func = torch.ops.aten._foreach_add_.List
    strategy = RULES[func](func, [t._spec for t in xs + ys], (xs, ys), {"alpha": 2.0})
    assert strategy.inputs == ((Shard(0),), (R,), (Shard(0),), (R,))  # every element follows its self
    assert strategy.output == []  # in place: nothing returned
    func = torch.ops.aten._foreach_mul.Scalar
    strategy = RULES[func](func, [xs[0]._spec, ys[1]._spec], ([xs[0], ys[1]], 3.0), {})
    assert strategy.output == [(Shard(0),), (Shard(1),)]


def test_monotone_ops_keep_a_pending_max_or_min():
    from dtensor import DTensor

    aten, pmax, pmin = torch.ops.aten, Partial("max"), Partial("min")
    spec = op((4,), pmax).spec
    x = DTensor(torch.empty(4, device="meta", dtype=spec.dtype), spec)

    def output(func, *args):
        return RULES[func](func, [spec], (x, *args), {}).output

    for func in (aten.floor.default, aten.round.decimals, aten.sgn.default, aten.nan_to_num.default):
        assert output(func) == (pmax,), func
    assert output(aten.erfc.default) == (pmin,)  # decreasing
    assert output(aten.threshold.default, 0.0, -1.0) == (pmax,)
    # x > 0 ? x : 5 is not monotone: the max of 1 and -1 is 1, yet their images are 1 and 5 (torch keeps it)
    assert output(aten.threshold.default, 0.0, 5.0) == (R,)
