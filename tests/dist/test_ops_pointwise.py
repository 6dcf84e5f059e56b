"""Pointwise, in-place, ``_foreach_*``, fused-optimizer and tensor-op rules on real gloo ranks.

Every case runs through ``check_op`` (results equal the full-tensor run, no replicate fallback) and, where
torch's DTensor has a strategy, our output placements must equal torch's. Inputs and placements are drawn
from seeded generators, so every rank builds the same case. Cases are batched: one ``run_ranks`` call per
family and world size.
"""

from __future__ import annotations

import random

import pytest
import torch

import dtensor
from dtensor import Partial, Replicate, Shard
from dtensor.dispatch import fallback_ops
from tests.dist.opcheck import check_case, check_op, distribute
from tests.ranks import mesh, run_ranks

MESHES = {2: [(2,)], 4: [(4,), (2, 2)]}

# Shapes of the operands of one call: equal, broadcasting, uneven on 4 ranks, 0-d.
SAME = [(5, 4), (5, 4)]
BROADCASTS = [
    SAME, [(5, 4), (4,)], [(5, 1), (1, 4)], [(5, 4), ()], [(3, 5, 4), (5, 1)], [(1, 4), (5, 4)], [(8, 6), (8, 6)]
]
TRIPLES = [[(5, 4)] * 3, [(5, 4), (4,), (5, 1)], [(6, 4), (), (6, 4)]]
UNARY = [[(5, 4)], [(8, 6)], [(3, 5, 4)], [(1, 4)], [()]]

# (name, fn, operand shapes, inputs made positive)
UNARY_OPS = [
    ("neg", torch.neg, False), ("abs", torch.abs, False), ("exp", torch.exp, False), ("log", torch.log, True),
    ("sqrt", torch.sqrt, True), ("rsqrt", torch.rsqrt, True), ("reciprocal", torch.reciprocal, True),
    ("sign", torch.sign, False), ("sin", torch.sin, False), ("cos", torch.cos, False), ("tanh", torch.tanh, False),
    ("sigmoid", torch.sigmoid, False), ("relu", torch.relu, False), ("gelu", torch.nn.functional.gelu, False),
    ("silu", torch.nn.functional.silu, False), ("erf", torch.erf, False),
    ("pow_scalar", lambda x: x**2, False), ("pow_half", lambda x: x**0.5, True), ("rpow", lambda x: 2.0**x, False),
    ("mul_scalar", lambda x: x * 3.0, False), ("div_scalar", lambda x: x / 4.0, False),
    ("add_scalar", lambda x: x + 1.5, False), ("clamp", lambda x: torch.clamp(x, -0.5, 0.5), False),
    ("clamp_min", lambda x: torch.clamp_min(x, 0.1), False), ("clamp_max", lambda x: torch.clamp_max(x, 0.1), False),
    ("gt_scalar", lambda x: x > 0.2, False), ("eq_scalar", lambda x: x == 0, False),
    ("logical_not", lambda x: torch.logical_not(x > 0), False),
    ("to_float32", lambda x: x.to(torch.float32), False), ("to_int", lambda x: (x * 10).to(torch.int64), False),
    ("to_bool", lambda x: x.to(torch.bool), False),
]
BINARY_OPS = [
    ("add", torch.add, False), ("sub", lambda x, y: torch.sub(x, y, alpha=0.5), False), ("mul", torch.mul, False),
    ("div", torch.div, True), ("maximum", torch.maximum, False), ("minimum", torch.minimum, False),
    ("pow", torch.pow, True), ("eq", torch.eq, False), ("ne", torch.ne, False), ("lt", torch.lt, False),
    ("le", torch.le, False), ("gt", torch.gt, False), ("ge", torch.ge, False),
    ("where", lambda x, y: torch.where(x > 0, x, y), False),
    ("where_scalar", lambda x, y: torch.where(y > 0, x, 0.0), False),
    ("masked_fill", lambda x, y: x.masked_fill(y > 0, 1.0), False),
    ("logical_and", lambda x, y: torch.logical_and(x > 0, y > 0), False),
    ("logical_or", lambda x, y: torch.logical_or(x > 0, y > 0), False),
    ("lerp", lambda x, y: torch.lerp(x, y, 0.3), False), ("clamp_min_t", torch.clamp_min, False),
    ("threshold_backward", lambda g, x: torch.ops.aten.threshold_backward(g, x, 0.0), False),
    ("gelu_backward", lambda g, x: torch.ops.aten.gelu_backward(g, x), False),
    ("sigmoid_backward", lambda g, y: torch.ops.aten.sigmoid_backward(g, y), False),
    ("tanh_backward", lambda g, y: torch.ops.aten.tanh_backward(g, y), False),
    ("silu_backward", lambda g, x: torch.ops.aten.silu_backward(g, x), False),
]
TERNARY_OPS = [
    ("addcmul", lambda a, b, c: torch.addcmul(a, b, c, value=0.5), False),
    ("addcdiv", lambda a, b, c: torch.addcdiv(a, b, c, value=0.5), True),
    ("lerp_tensor", torch.lerp, False), ("where3", lambda c, a, b: torch.where(c > 0, a, b), False),
    ("clamp_tensor", lambda x, lo, hi: torch.clamp(x, lo - 1, hi + 1), False),
]


def _random_placements(rng: random.Random, ndim: int, mesh_ndim: int, partial: bool = True):
    """Shard(d) / Replicate / one Partial kind, drawn per mesh dim."""
    kind = rng.choice(["sum", "sum", "avg", "max"])
    choices = [Shard(d) for d in range(ndim)] + [Replicate()] + ([Partial(kind)] if partial else [])
    return [rng.choice(choices) for _ in range(mesh_ndim)]


def _inputs(shapes, positive: bool):
    xs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    return [x.abs() + 0.5 for x in xs] if positive else xs


def _run_cases(m, rng, ops, shape_sets, per_op: int, target_partial: bool = True):
    """check_op each op on ``per_op`` random (shapes, placements); return cases whose placements differ from torch's.

    With ``target_partial=False`` the first operand (an in-place target) is never Partial.
    """
    differ = []
    for name, fn, positive in ops if per_op else ():
        for shapes in rng.sample(shape_sets, min(per_op, len(shape_sets))):
            xs = _inputs(shapes, positive)
            placements = [_random_placements(rng, len(s), m.ndim, k > 0 or target_partial)
                          for k, s in enumerate(shapes)]
            rec = check_case(f"{name} of shapes {shapes}", m, _on_pristine(fn, xs), xs, placements)
            if rec["torch"] is not None and rec["torch"] != rec["placements"]:
                differ.append((name, tuple(m.shape), shapes, placements, rec["placements"], rec["torch"]))
            if not target_partial:  # in place: the target keeps its layout
                assert rec["placements"][0] == tuple(placements[0]), (name, placements, rec["placements"])
    return differ


def _on_pristine(fn, xs):
    """``fn`` whose full-tensor run sees the inputs as made: ``distribute_tensor(src_data_rank=None)`` may alias
    its input (Replicate, or contiguous shards), so an in-place op on the DTensor also writes the input."""
    pristine = [x.clone() for x in xs]

    def run(*args):
        if all(type(a) is torch.Tensor for a in args):  # the full-tensor run, not ours or torch's DTensor
            args = [p.clone() for p in pristine]
        return fn(*args)

    return run


def _each_mesh(world: int, body):
    """Run ``body(mesh, rng)`` on every mesh of the world, seeded per mesh; concatenate what it returns."""
    out = []
    for shape in MESHES[world]:
        rng = random.Random(sum(shape) * 7 + len(shape))
        torch.manual_seed(len(shape))
        out += body(mesh(shape), rng)
    return out


# Random draws per op (unary, binary, ternary) on each mesh: 4 ranks on 2 cores are slow, so the 1-D
# (4,) mesh only checks the binary ops (uneven 5 rows, broadcasting) once each.
DRAWS = {(2,): (2, 3, 2), (4,): (0, 1, 0), (2, 2): (1, 1, 1)}


def _pointwise(m, rng):
    unary, binary, ternary = DRAWS[tuple(m.shape)]
    return (
        _run_cases(m, rng, UNARY_OPS, UNARY, unary)
        + _run_cases(m, rng, BINARY_OPS, BROADCASTS, binary)
        + _run_cases(m, rng, TERNARY_OPS, TRIPLES, ternary)
    )


@pytest.mark.parametrize("world", [2, 4])
def test_pointwise_matches_full_tensors_and_torch_placements(world):
    differ = run_ranks(world, _each_mesh, world, _pointwise)[0]
    assert not differ, "placements differ from torch's DTensor:\n" + "\n".join(map(str, differ))


# In place: the target (first operand) is the biggest; the others broadcast into it.
INPLACE_SHAPES = [SAME, [(5, 4), (4,)], [(5, 4), (5, 1)], [(5, 4), ()], [(8, 6), (8, 6)]]
INPLACE_TRIPLES = [[(5, 4)] * 3, [(5, 4), (4,), (5, 1)], [(6, 4), (), (6, 4)]]


def _ip(method, *extra, **kw):
    def fn(x, *others):
        getattr(x, method)(*others, *extra, **kw)
        return x

    fn.__name__ = method
    return fn


INPLACE_UNARY = [
    ("neg_", _ip("neg_"), False), ("exp_", _ip("exp_"), False), ("sqrt_", _ip("sqrt_"), True),
    ("mul_scalar_", _ip("mul_", 0.9), False), ("div_scalar_", _ip("div_", 3.0), False),
    ("add_scalar_", _ip("add_", 1.0), False), ("clamp_", _ip("clamp_", -0.3, 0.3), False),
    ("clamp_min_", _ip("clamp_min_", 0.0), False), ("zero_", _ip("zero_"), False), ("fill_", _ip("fill_", 2.5), False),
    ("pow_", _ip("pow_", 2), False), ("to_", lambda x: x.to(torch.float32).to(torch.float64), False),
]
INPLACE_BINARY = [
    ("add_", _ip("add_", alpha=0.5), False), ("sub_", _ip("sub_"), False), ("mul_", _ip("mul_"), False),
    ("div_", _ip("div_"), True), ("lerp_", _ip("lerp_", 0.3), False), ("copy_", _ip("copy_"), False),
    ("masked_fill_", lambda x, y: x.masked_fill_(y > 0, -1.0), False), ("clamp_min_t_", _ip("clamp_min_"), False),
]
INPLACE_TERNARY = [
    ("addcmul_", _ip("addcmul_", value=0.5), False), ("addcdiv_", _ip("addcdiv_", value=0.5), True),
    ("lerp_tensor_", _ip("lerp_"), False),
]


def _inplace(m, rng):
    return (
        _run_cases(m, rng, INPLACE_UNARY, [[(5, 4)], [(8, 6)], [()]], 2, target_partial=False)
        + _run_cases(m, rng, INPLACE_BINARY, INPLACE_SHAPES, 3, target_partial=False)
        + _run_cases(m, rng, INPLACE_TERNARY, INPLACE_TRIPLES, 2, target_partial=False)
    )


@pytest.mark.parametrize("world", [2, 4])
def test_inplace_keeps_target_layout(world):
    differ = run_ranks(world, _each_mesh, world, _inplace)[0]
    assert not differ, "placements differ from torch's DTensor:\n" + "\n".join(map(str, differ))


def _partial_cases():
    """Partial("sum") survives exactly the ops linear in it; in place on a Partial target needs linearity.

    P+R (also in place) keeps P by splitting R into terms (free); P*P (also in place) reduces the second
    operand and multiplies P by R. A Partial target of a non-linear in-place op is an error, as in torch.
    """
    m = mesh((2,))
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    s = torch.tensor(1.5, dtype=torch.float64)
    P, R = [Partial()], [Replicate()]
    got = {}
    for name, fn, inputs, placements in [
        ("P+P", torch.add, [x, y], [P, P]),
        ("P-P", torch.sub, [x, y], [P, P]),
        ("-P", torch.neg, [x], [P]),
        ("P*2", lambda a: a * 2.0, [x], [P]),
        ("P/2", lambda a: a / 2.0, [x], [P]),
        ("P*R", torch.mul, [x, y], [P, R]),
        ("R*P", torch.mul, [x, y], [R, P]),
        ("P/R", torch.div, [x, y], [P, R]),
        ("P*R0d", torch.mul, [x, s], [P, R]),
        ("P*P", torch.mul, [x, y], [P, P]),
        ("R/P", torch.div, [x, y], [R, P]),
        ("P+R", torch.add, [x, y], [P, R]),
        ("P+2", lambda a: a + 2.0, [x], [P]),
        ("exp(P)", torch.exp, [x], [P]),
        ("P.add_(P)", _ip("add_"), [x, y], [P, P]),
        ("P.add_(R)", _ip("add_"), [x, y], [P, R]),
        ("P.mul_(P)", _ip("mul_"), [x, y], [P, P]),
        ("P.mul_(R)", _ip("mul_"), [x, y], [P, R]),
        ("P.mul_(2)", _ip("mul_", 2.0), [x], [P]),
        ("P.zero_()", _ip("zero_"), [x], [P]),
        ("P.copy_(R)", _ip("copy_"), [x, y], [P, R]),
        ("clone(P)", torch.clone, [x], [P]),
        ("P.to(f32)", lambda a: a.to(torch.float32), [x], [P]),
        ("P.to(int)", lambda a: a.to(torch.int64), [x], [P]),
    ]:
        rec = check_op(m, fn, inputs, placements)
        got[name] = (rec["placements"][0], rec["torch"][0] if rec["torch"] else None)
    for name, fn, inputs, placements in [
        ("P.add_(2)", _ip("add_", 2.0), [x], [P]),
        ("P.clamp_()", _ip("clamp_", -0.5, 0.5), [x], [P]),
        ("P.exp_()", _ip("exp_"), [x], [P]),
        ("P.fill_(1)", _ip("fill_", 1.0), [x], [P]),
    ]:
        try:
            check_op(m, fn, inputs, placements, compare_with_torch=False)
            got[name] = "ran"
        except RuntimeError as e:
            got[name] = "in-place" in str(e) or "in place" in str(e)
    return got


def test_partial_survives_only_linear_ops():
    got = run_ranks(2, _partial_cases)[0]
    P, R = (Partial(),), (Replicate(),)
    for name in ["P+P", "P-P", "-P", "P*2", "P/2", "P*R", "R*P", "P/R", "P*R0d", "P.add_(P)", "P.mul_(R)", "P.mul_(2)",
                 "P.zero_()", "P.copy_(R)", "P.to(f32)", "P+R", "P*P", "P.add_(R)", "P.mul_(P)"]:
        assert got[name][0] == P, (name, got[name])
    for name in ["R/P", "exp(P)", "P.to(int)", "clone(P)", "P+2"]:  # clone and adding a number reduce first, as torch's
        assert got[name][0] == R, (name, got[name])
    for name, (ours, theirs) in ((k, v) for k, v in got.items() if isinstance(v, tuple)):
        assert theirs is None or ours == theirs, (name, ours, theirs)
    for name in ["P.add_(2)", "P.clamp_()", "P.exp_()", "P.fill_(1)"]:
        assert got[name] is True, (name, got[name])


# _foreach_*: lists of three tensors (uneven, 1-d, 3-d); every list's i-th element has the i-th shape.
LIST_SHAPES = [(5, 4), (6,), (3, 5, 4)]


def _lists(k: int, fn, extra: int = 0):
    """fn over ``k`` lists of len(LIST_SHAPES) tensors followed by ``extra`` single tensors."""
    n = len(LIST_SHAPES)

    def run(*ts):
        return fn(*[list(ts[i * n:(i + 1) * n]) for i in range(k)], *ts[k * n:])

    return run


def _self(fn):
    """An in-place foreach op, returning its (mutated) first list."""

    def run(xs, *rest):
        fn(xs, *rest)
        return xs

    return run


F = torch
FOREACH_OPS = [  # (name, lists, fn, positive, in place)
    ("add_list", 2, lambda a, b: F._foreach_add(a, b, alpha=0.5), False, False),
    ("add_list_", 2, _self(F._foreach_add_), False, True),
    ("add_scalar", 1, lambda a: F._foreach_add(a, 1.5), False, False),
    ("add_scalarlist_", 1, _self(lambda a: F._foreach_add_(a, [1.0, 2.0, 3.0])), False, True),
    ("sub_list", 2, F._foreach_sub, False, False),
    ("sub_scalar_", 1, _self(lambda a: F._foreach_sub_(a, 0.5)), False, True),
    ("mul_list", 2, F._foreach_mul, False, False),
    ("mul_scalar_", 1, _self(lambda a: F._foreach_mul_(a, 0.9)), False, True),
    ("mul_scalarlist", 1, lambda a: F._foreach_mul(a, [0.5, 2.0, 3.0]), False, False),
    ("div_list", 2, F._foreach_div, True, False),
    ("div_scalarlist_", 1, _self(lambda a: F._foreach_div_(a, [0.5, 2.0, 3.0])), False, True),
    ("addcmul_", 3, _self(lambda a, b, c: F._foreach_addcmul_(a, b, c, 0.5)), False, True),
    ("addcdiv_scalarlist_", 3, _self(lambda a, b, c: F._foreach_addcdiv_(a, b, c, [0.1, 0.2, 0.3])), True, True),
    ("lerp_", 2, _self(lambda a, b: F._foreach_lerp_(a, b, 0.1)), False, True),
    ("sqrt", 1, F._foreach_sqrt, True, False),
    ("sqrt_", 1, _self(F._foreach_sqrt_), True, True),
    ("neg", 1, F._foreach_neg, False, False),
    ("maximum_", 2, _self(F._foreach_maximum_), False, True),
    ("copy_", 2, _self(F._foreach_copy_), False, True),
    ("zero_", 1, _self(F._foreach_zero_), False, True),
    ("pow_scalar", 1, lambda a: F._foreach_pow(a, 2.0), False, False),
    ("pow_list", 2, F._foreach_pow, True, False),
    ("reciprocal_", 1, _self(F._foreach_reciprocal_), True, True),
    ("clamp_min_", 1, _self(lambda a: F._foreach_clamp_min_(a, 0.0)), False, True),
]


def _foreach(m, rng):
    differ = []
    for name, k, fn, positive, inplace in FOREACH_OPS:
        shapes = LIST_SHAPES * k
        xs = _inputs(shapes, positive)
        placements = [_random_placements(rng, len(s), m.ndim, not inplace or j >= 3) for j, s in enumerate(shapes)]
        rec = check_op(m, _on_pristine(_lists(k, fn), xs), xs, placements)
        if inplace:
            assert rec["placements"] == [tuple(p) for p in placements[:3]], (name, placements, rec["placements"])
        if rec["torch"] is not None and rec["torch"] != rec["placements"]:
            differ.append((name, tuple(m.shape), placements, rec["placements"], rec["torch"]))
    # one tensor shared by every element: the 0-d clip coefficient of clip_grad_norm_
    xs = _inputs(LIST_SHAPES, False) + [torch.tensor(0.5, dtype=torch.float64)]
    placements = [_random_placements(rng, len(s.shape), m.ndim, False) for s in xs[:3]] + [[Replicate()] * m.ndim]
    check_op(m, _on_pristine(_lists(1, _self(F._foreach_mul_)), xs), xs, placements)
    return differ


@pytest.mark.parametrize("world", [2, 4])
def test_foreach_per_element(world):
    differ = run_ranks(world, _each_mesh, world, _foreach)[0]
    assert not differ, "placements differ from torch's DTensor:\n" + "\n".join(map(str, differ))


# Optimizers: params of mixed layouts, a few steps, equal to the plain run.
PARAM_SHAPES = [(8, 6), (6,), (5, 4)]
OPTIMIZERS = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False)),
    ("sgd_foreach", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=True)),
    ("sgd_fused", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, foreach=False)),
    ("adam_foreach", lambda p: torch.optim.Adam(p, lr=0.01, foreach=True)),
    ("adam_fused", lambda p: torch.optim.Adam(p, lr=0.01, fused=True)),
    ("adamw_foreach", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=True)),
    ("adamw_fused", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True)),
    ("adamw_amsgrad", lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True, foreach=False)),
]
# Ops of other families that clip_grad_norm_ needs; allowed to fall back while they have no rule.
NORM_OPS = {"aten._foreach_norm.Scalar", "aten.linalg_vector_norm.default", "aten.stack.default"}


def _steps(make, params, grads, clip: bool, steps: int = 3):
    opt = make(params)
    norms = []
    for s in range(steps):
        for p, g in zip(params, grads[s]):
            p.grad = g
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm=0.5, foreach=s % 2 == 0))
        opt.step()
    return norms


def _optimizers(m, placements_per_param, names):
    torch.manual_seed(0)
    full = [torch.randn(s, dtype=torch.float64) for s in PARAM_SHAPES]
    grads = [[torch.randn(s, dtype=torch.float64) for s in PARAM_SHAPES] for _ in range(3)]
    fell_back = set()
    for name, make in [(n, mk) for n, mk in OPTIMIZERS if n in names]:
        for clip in (False, True):
            if clip and name not in ("sgd", "adamw_foreach"):
                continue
            before = set(fallback_ops)
            dparams = [torch.nn.Parameter(dtensor.distribute_tensor(x, m, pl))
                       for x, pl in zip(full, placements_per_param)]
            dgrads = [[dtensor.distribute_tensor(g, m, pl) for g, pl in zip(gs, placements_per_param)] for gs in grads]
            dnorms = _steps(make, dparams, dgrads, clip)
            plain = [torch.nn.Parameter(x.clone()) for x in full]
            norms = _steps(make, plain, [[g.clone() for g in gs] for gs in grads], clip)
            for d, p in zip(dparams, plain):
                assert torch.allclose(d.full_tensor(), p.detach(), atol=1e-10), (name, clip, d.placements)
                assert d.placements == dtensor.distribute_tensor(p.detach(), m, d.placements).placements
            for dn, n in zip(dnorms, norms):
                assert torch.allclose(dn.full_tensor(), n), (name, dn, n)
            new = set(fallback_ops) - before
            assert new <= (NORM_OPS if clip else set()), (name, clip, new)
            fell_back |= new
    return sorted(fell_back)


OPT_LAYOUTS = {
    (2,): [[Shard(0)], [Replicate()], [Shard(1)]],
    (2, 2): [[Shard(0), Shard(1)], [Replicate(), Shard(0)], [Shard(0), Replicate()]],
}


def _optimizer_body(world):
    """Every optimizer path on (2,); the list paths on the slower 4-rank (2, 2) mesh."""
    shape = (2,) if world == 2 else (2, 2)
    names = [n for n, _ in OPTIMIZERS] if world == 2 else ["sgd_fused", "adam_foreach", "adamw_foreach", "adamw_fused"]
    return _optimizers(mesh(shape), OPT_LAYOUTS[shape], names)


@pytest.mark.parametrize("world", [2, 4])
def test_optimizers_match_plain_run(world):
    fell_back = run_ranks(world, _optimizer_body, world)[0]
    assert set(fell_back) <= NORM_OPS, fell_back
    print("clip_grad_norm_ fell back for", fell_back)


# Tensor ops: copies, *_like and new_* factories, casts; equal and item return plain values.
TENSOR_OPS = [
    ("clone", torch.clone), ("detach", torch.Tensor.detach), ("contiguous", lambda x: x.t().contiguous()),
    ("to_f32", lambda x: x.to(torch.float32)), ("to_int", lambda x: x.to(torch.int32)),
    ("zeros_like", torch.zeros_like), ("ones_like", torch.ones_like), ("full_like", lambda x: torch.full_like(x, 7.0)),
    ("empty_like_zero", lambda x: torch.empty_like(x).zero_()),
    ("new_zeros_same", lambda x: x.new_zeros(x.shape)), ("new_ones_same", lambda x: x.new_ones(x.shape)),
    ("new_full_same", lambda x: x.new_full(x.shape, 3.0)), ("new_zeros_other", lambda x: x.new_zeros((3, 2))),
    ("new_ones_other", lambda x: x.new_ones((7,))), ("new_empty_zero", lambda x: x.new_empty(x.shape).zero_()),
    ("new_empty_strided_fill", lambda x: x.new_empty_strided(x.shape, x.stride()).fill_(1.0)),
]


def _known(name: str, placements) -> bool:
    """Where we differ from torch on purpose, both right: a Partial input to clone stays Partial (torch
    reduces it first, a needless collective); new_ones/new_full of a Partial input are not Partial (torch
    keeps a Partial next to a Shard, which gives n times the value under Partial("sum"))."""
    names = ("clone", "contiguous", "new_ones_same", "new_full_same", "new_zeros_same")
    return any(p.is_partial() for p in placements) and name in names


def _tensor_ops(m, rng):
    differ = []
    for name, fn in TENSOR_OPS:
        for shape in ([(5, 4)], [(8, 6)]):
            xs = _inputs(shape, False)
            placements = [_random_placements(rng, 2, m.ndim, partial=not name.startswith(("new_empty", "empty")))]
            rec = check_op(m, fn, xs, placements)
            if rec["torch"] is not None and rec["torch"] != rec["placements"] and not _known(name, placements[0]):
                differ.append((name, tuple(m.shape), placements, rec["placements"], rec["torch"]))
    for _ in range(4):  # equal: any two layouts; a difference held by one rank only
        x = torch.randn(5, 4, dtype=torch.float64)
        y = x.clone()
        y[4, 3] += 1
        pa, pb = (_random_placements(rng, 2, m.ndim) for _ in range(2))
        a, b, c = distribute(x, m, pa), distribute(x, m, pb), distribute(y, m, pb)
        assert torch.equal(a, b) and not torch.equal(a, c), (pa, pb)
    for placements in ([Partial()] * m.ndim, [Replicate()] * m.ndim):
        assert distribute(torch.tensor(2.5, dtype=torch.float64), m, placements).item() == 2.5
    assert distribute(torch.tensor([4.0], dtype=torch.float64), m, [Shard(0)] * m.ndim).item() == 4.0
    return differ


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_ops(world):
    differ = run_ranks(world, _each_mesh, world, _tensor_ops)[0]
    assert not differ, "placements differ from torch's DTensor:\n" + "\n".join(map(str, differ))
