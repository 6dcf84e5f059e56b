"""``dtensor.experimental.register_sharding`` against torch's: the same registered function gives the
same placements and values on both, for custom ops neither library knows, for an aten op whose rule it
replaces (torch's own ``_softmax`` example), for several outputs and for in-place ops; a registration
that does not fit is refused naming the op.

Registrations last for the process, so these bodies run in workers of their own (``_POOL``)."""

import pytest
import torch
from torch.distributed.tensor._dtensor_spec import DTensorSpec as TorchSpec
from torch.distributed.tensor.experimental import register_sharding as torch_register_sharding

import dtensor
from dtensor.experimental import register_sharding
from dtensor.spec import DTensorSpec as OurSpec
from tests.parity import assert_same, both
from tests.ranks import close_pool, mesh, run_ranks

_POOL = "register_sharding"


@torch.library.custom_op("shardstore_test::row_normalize", mutates_args=())
def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum: rows are independent, columns are not."""
    return x / x.sum(dim=1, keepdim=True)


@row_normalize.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("shardstore_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x + alpha * y


@scaled_add.register_fake
def _(x, y, alpha):
    return torch.empty_like(x)


@torch.library.custom_op("shardstore_test::halves", mutates_args=())
def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second half of every row (its columns cannot be sharded)."""
    n = x.shape[1] // 2
    return x[:, :n].clone(), x[:, n:].clone()


@halves.register_fake
def _(x):
    n = x.shape[1] // 2
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], x.shape[1] - n)


@torch.library.custom_op("shardstore_test::side_by_side", mutates_args=())
def side_by_side(xs: list[torch.Tensor], scale: float) -> torch.Tensor:
    """The tensors of a list, scaled and concatenated along dim 1 (a ``Tensor[]`` argument)."""
    return torch.cat(xs, dim=1) * scale


@side_by_side.register_fake
def _(xs, scale):
    return xs[0].new_empty(xs[0].shape[0], sum(x.shape[1] for x in xs))


@torch.library.custom_op("shardstore_test::add_one_", mutates_args=("x",))
def add_one_(x: torch.Tensor) -> None:
    x.add_(1)


def _register(lib) -> None:
    """The same shardings, registered with ``lib``'s register_sharding."""
    register = register_sharding if lib is dtensor else torch_register_sharding
    S, R = lib.Shard, lib.Replicate()

    @register(torch.ops.shardstore_test.row_normalize.default)
    def _rows(x):
        return [([R], [R]), ([S(0)], [S(0)])]

    @register(torch.ops.shardstore_test.scaled_add.default)
    def _add(x, y, alpha):
        return [([R], [R, R, None])] + [([S(d)], [S(d), S(d), None]) for d in range(x.ndim)]

    @register(torch.ops.shardstore_test.halves.default)
    def _halves(x):
        return [([R, R], [R]), ([S(0), S(0)], [S(0)])]

    @register(torch.ops.shardstore_test.side_by_side.default)
    def _side_by_side(xs, scale):
        # As torch gives it: the list as a tuple of specs, and one input placement per tensor in it.
        assert isinstance(xs, tuple) and all(isinstance(x, OurSpec if lib is dtensor else TorchSpec) for x in xs), xs
        return [([R], [R] * len(xs) + [None]), ([S(0)], [S(0)] * len(xs) + [None])]

    @register(torch.ops.shardstore_test.add_one_.default)
    def _add_one(x):
        return [([], [R])] + [([], [S(d)]) for d in range(x.ndim)]

    @register(torch.ops.aten._softmax.default)  # torch's own example: any dim but the softmax's
    def _softmax(x, dim, half_to_float):
        dim = dim if dim >= 0 else dim + x.ndim
        return [([R], [R, None, None])] + [([S(d)], [S(d), None, None]) for d in range(x.ndim) if d != dim]


def _placements(lib, names: tuple[str, ...]):
    return [lib.Shard(int(n[1:])) if n[0] == "S" else lib.Replicate() if n == "R" else lib.Partial() for n in names]


def _calls(lib, mesh_shape, x_at, y_at):
    _register(lib)
    m = mesh(mesh_shape)
    torch.manual_seed(0)
    a, b = torch.rand(8, 6) + 0.5, torch.rand(8, 6)
    x = lib.distribute_tensor(a, m, _placements(lib, x_at))
    y = lib.distribute_tensor(b, m, _placements(lib, y_at))
    inplace = lib.distribute_tensor(a.clone(), m, _placements(lib, x_at))  # torch's Replicate shares a's memory
    torch.ops.shardstore_test.add_one_(inplace)
    return {
        "row_normalize": torch.ops.shardstore_test.row_normalize(x),
        "scaled_add": torch.ops.shardstore_test.scaled_add(x, y, 0.5),
        "halves": torch.ops.shardstore_test.halves(x),
        "add_one_": inplace,
        "side_by_side": torch.ops.shardstore_test.side_by_side([x, y, x], 2.0),
        "softmax dim 0": torch.softmax(x, 0),
        "softmax dim 1": torch.softmax(y, -1),
    }


def _same(mesh_shape, x_at, y_at):
    ours, theirs = both(_calls, mesh_shape, x_at, y_at)
    for name in ours:
        assert_same(ours[name], theirs[name], atol=1e-6, what=f"{name} with x {x_at}, y {y_at}")
    return True


_LAYOUTS = {
    (2,): [(("S0",), ("S1",)), (("S1",), ("S0",)), (("R",), ("S1",))],
    (4,): [(("S1",), ("S1",)), (("S0",), ("R",))],
    (2, 2): [(("S0", "S1"), ("S1", "R")), (("S1", "S0"), ("S0", "S0")), (("R", "S1"), ("S1", "S1"))],
}


@pytest.fixture(scope="module", autouse=True)
def _own_workers():
    yield
    for world in (2, 4):
        close_pool(world, _POOL)


@pytest.mark.parametrize("mesh_shape", list(_LAYOUTS))
def test_registered_shardings_match_torch(mesh_shape):
    world = 1
    for n in mesh_shape:
        world *= n
    for x_at, y_at in _LAYOUTS[mesh_shape]:
        assert all(run_ranks(world, _same, mesh_shape, x_at, y_at, pool=_POOL))


def _refusals():
    _register(dtensor)
    m = mesh((2,))
    R = dtensor.Replicate()
    x = dtensor.distribute_tensor(torch.ones(4, 4), m, [dtensor.Shard(0)])
    seen = []

    @register_sharding(torch.ops.shardstore_test.scaled_add.default)
    def _too_few(x, y, alpha):
        return [([R], [R, None, None])]

    with pytest.raises(ValueError, match=r"shardstore_test.scaled_add.default.*1 input placements for 2 DTensor"):
        torch.ops.shardstore_test.scaled_add(x, x, 1.0)
    seen.append("count")

    @register_sharding(torch.ops.shardstore_test.add_one_.default)
    def _replicate_only(x):
        return [([], [R])]

    with pytest.raises(RuntimeError, match=r"add_one_.default: none of the shardings registered for it fits.*Shard\(dim=0\)"):
        torch.ops.shardstore_test.add_one_(x)
    seen.append("in-place")
    assert torch.equal(x.full_tensor(), torch.ones(4, 4))  # nothing ran

    with pytest.raises(TypeError, match="op overload"):
        register_sharding(torch.ops.shardstore_test.add_one_)
    seen.append("packet")
    return seen


def test_registrations_that_do_not_fit_are_refused_naming_the_op():
    assert run_ranks(2, _refusals, pool=_POOL) == [["count", "in-place", "packet"]] * 2


def _unregistered_falls_back():
    @torch.library.custom_op("shardstore_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    twice.register_fake(lambda x: torch.empty_like(x))
    x = dtensor.distribute_tensor(torch.arange(8.0), mesh((2,)), [dtensor.Shard(0)])
    with pytest.warns(UserWarning, match="no sharding rule for shardstore_test.twice"):
        before = torch.ops.shardstore_test.twice(x)

    @register_sharding(torch.ops.shardstore_test.twice.default)
    def _any(x):
        return [([dtensor.Shard(0)], [dtensor.Shard(0)])]

    after = torch.ops.shardstore_test.twice(x)  # the plan cached before the registration is not reused
    return before.placements, after.placements, torch.equal(after.full_tensor(), 2 * torch.arange(8.0))


def test_a_registration_replaces_the_plan_cached_before_it():
    assert run_ranks(2, _unregistered_falls_back, pool=_POOL) == [((dtensor.Replicate(),), (dtensor.Shard(0),), True)] * 2
