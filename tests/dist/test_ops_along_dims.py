"""Ops that work along some dims (scans, sort/topk, flip, roll, pad, tril/triu) on real gloo ranks.

Each case is drawn (seeded, the same on every rank) over 3-d shapes with uneven and empty shards and random
input placements; ``check_op`` asserts the result equals the op on the full tensor and that no op fell back.
Placements must equal torch's DTensor's, except where ours stay sharded (or pending) and torch's are
replicated: ``tril``/``triu`` keep every shard and a pending sum (torch replicates the two matrix dims
and resolves the sum); a dim with empty shards stays
sharded (torch replicates it); a pending sum that ``cumprod`` or a non-zero pad must resolve is
reduce-scattered onto another dim, where torch all-reduces it (it does reduce-scatter for ``cummax``);
from a replicated or pending input on a 2-d mesh, torch may also chunk a mesh dim that ours leaves whole.
"""


import torch
import torch.nn.functional as F

from dtensor import Partial, Replicate, Shard
from tests.dist.opcheck import check_case, seeded_mesh, stays_more_sharded
from tests.ranks import run_ranks

OPS = {
    "cumsum": lambda x: x.cumsum(1),
    "cumprod": lambda x: x.cumprod(0),
    "logcumsumexp": lambda x: x.logcumsumexp(2),
    "cummax": lambda x: x.cummax(1),
    "cummin": lambda x: x.cummin(-1),
    "sort": lambda x: x.sort(1),
    "sort_stable_descending": lambda x: x.sort(dim=0, descending=True, stable=True),
    "argsort": lambda x: x.argsort(2),
    "topk": lambda x: x.topk(2, dim=1),
    "flip": lambda x: x.flip((0, 2)),
    "roll": lambda x: x.roll(2, 1),
    "roll_flat": lambda x: x.roll(3),
    "pad_last": lambda x: F.pad(x, (1, 2)),
    "pad_two": lambda x: F.pad(x, (1, 1, 2, 0), value=0.5),
    "repeat": lambda x: x.repeat(1, 2, 1),
    "repeat_new_dims": lambda x: x.repeat(2, 1, 1, 3),
    "diagonal": lambda x: x.diagonal(1, 0, 2),
    "diagonal_last": lambda x: torch.diagonal(x, -1, 1, 2).sum(-1),
    "tril": lambda x: x.tril(),
    "triu_1": lambda x: x.triu(1),
    "tril_-2": lambda x: x.tril(-2),
}
KEEP_SHARDS = {"tril", "triu_1", "tril_-2"}  # sharded in, sharded out


def _cases(mesh_shape, count: int, seed: int):
    m, rng = seeded_mesh(mesh_shape, seed)
    if m is None:
        return []
    out = []
    for name, fn in OPS.items():
        for _ in range(count):
            shape = tuple(rng.choice([2, 3, 4, 5, 7]) for _ in range(3))
            x = torch.randn(*shape, dtype=torch.float64)
            placements = [rng.choice([Replicate(), Partial(), Shard(0), Shard(1), Shard(2)]) for _ in mesh_shape]
            record = check_case(f"{name} of shape {shape}", m, fn, [x], [placements])
            out.append((name, shape, placements, record["placements"], record["torch"]))
    return out


def test_along_dims_ops_match_full_tensors_and_torch():
    for mesh_shape in [(2,), (4,), (2, 2)]:
        results = run_ranks(4, _cases, mesh_shape, 3, len(mesh_shape) * 10 + mesh_shape[0])[0]
        assert len(results) == 3 * len(OPS)
        differ = [r for r in results if r[4] is not None and r[3] != r[4] and not stays_more_sharded(r[2], r[3], r[4])]
        assert not differ, "\n".join(map(str, differ))
        kept = [r for r in results if r[0] in KEEP_SHARDS and any(p.is_shard() for p in r[2])]
        assert kept and all(any(p.is_shard() for p in ours[0]) for *_, ours, _ in kept)  # sharded in, sharded out
