"""Redistribution between two placement lists: a pure plan of per-mesh-dim steps, then its execution.

The plan (``plan_steps``) is data, cached, and testable without processes. It changes one mesh dim at a
time and respects nesting: sharding is applied outer mesh dim first, so an inner mesh dim that shards the
same tensor dim as an outer one that changes must be undone (gathered) before, and redone after. Phase 1
walks inner to outer undoing those; phase 2 walks outer to inner moving every mesh dim to its target.

Each step is one transition with the cheapest collective along its mesh dim: S->R all-gather, P->R
all-reduce, P->S reduce-scatter, S(i)->S(j) all-to-all, and R->S, R->P, S->P local work only.
``merge_steps`` then fuses consecutive steps that are the same collective on several mesh dims (P->R
with one reduce op; S(d)->R of one tensor dim cut by nested mesh dims) into one collective over the
flattened group of those mesh dims (on meshes that span the world, where every rank can create the
groups). Uneven shards (``torch.chunk`` layout) are padded to the common chunk size for the collective
and trimmed after.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import collectives
from .placements import Partial, Placement, Replicate, Shard, chunk_size, logical_shape, shard_size_and_offset

__all__ = ["Step", "plan_steps", "merge_steps", "merged_plan", "nested_pieces", "redistribute_local", "local_as", "pad_to", "partial_share"]


@dataclass(frozen=True)
class Step:
    """Move mesh dim ``mesh_dim`` from ``src`` to ``dst``; ``before`` is the full placement list then."""

    mesh_dim: int
    src: Placement
    dst: Placement
    before: tuple[Placement, ...]
    group: tuple[int, ...] = ()  # set by merge_steps: one collective over these mesh dims (ascending)


def _must_undo(current: list[Placement], target: Sequence[Placement], mesh_dim: int) -> bool:
    """Whether an outer mesh dim that shards this one's tensor dim is about to change."""
    dim = current[mesh_dim].dim
    return any(
        current[k] != target[k] and (current[k] == Shard(dim) or target[k] == Shard(dim)) for k in range(mesh_dim)
    )


@functools.lru_cache(maxsize=1024)
def plan_steps(src: tuple[Placement, ...], dst: tuple[Placement, ...]) -> tuple[Step, ...]:
    """The ordered transitions that turn placements ``src`` into ``dst`` on the same mesh."""
    current = list(src)
    steps: list[Step] = []

    def move(mesh_dim: int, to: Placement) -> None:
        steps.append(Step(mesh_dim, current[mesh_dim], to, tuple(current)))
        current[mesh_dim] = to

    for i in reversed(range(len(current))):
        if isinstance(current[i], Shard) and _must_undo(current, dst, i):
            move(i, Replicate())
    for i in range(len(current)):
        if current[i] != dst[i]:
            move(i, dst[i])
    return tuple(steps)


def _mergeable(done: Step, step: Step) -> bool:
    """Whether ``step`` repeats ``done``'s collective on another mesh dim: the same all-reduce, or an
    all-gather of the same tensor dim from a mesh dim outside ``done``'s, with nobody else cutting it."""
    if not (done.dst.is_replicate() and step.dst.is_replicate() and step.src == done.src):
        return False
    if step.src.is_partial():
        return True
    dims = done.group or (done.mesh_dim,)
    others = [p for k, p in enumerate(step.before) if k > step.mesh_dim and k not in dims]
    return isinstance(step.src, Shard) and step.mesh_dim < min(dims) and step.src not in others


def merge_steps(steps: Sequence[Step]) -> tuple[Step, ...]:
    """Consecutive steps that are the same collective on different mesh dims become one step over the
    flattened group of those mesh dims (one latency instead of one per mesh dim)."""
    out: list[Step] = []
    for step in steps:
        if out and _mergeable(out[-1], step):
            dims = tuple(sorted({*(out[-1].group or (out[-1].mesh_dim,)), step.mesh_dim}))
            step = Step(step.mesh_dim, step.src, step.dst, step.before, dims)
            out[-1] = step
        else:
            out.append(step)
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def merged_plan(src: tuple[Placement, ...], dst: tuple[Placement, ...]) -> tuple[Step, ...]:
    return merge_steps(plan_steps(src, dst))


def nested_pieces(size: int, counts: Sequence[int]) -> list[int]:
    """Sizes of the pieces of a dim of ``size`` cut by mesh dims of ``counts`` (outer first), in
    row-major order of their coordinates: each cut is ``torch.chunk`` of the piece above."""
    pieces = [size]
    for n in counts:
        pieces = [shard_size_and_offset(p, n, i)[0] for p in pieces for i in range(n)]
    return pieces


def _over_group(local: torch.Tensor, step: Step, mesh, logical: Sequence[int]) -> torch.Tensor:
    """A merged step: one all-reduce, or one all-gather trimmed piece by piece when uneven."""
    if step.src.is_partial():
        return collectives.all_reduce(local, step.src.reduce_op, mesh, step.group)
    dim = step.src.dim
    pieces = nested_pieces(logical[dim], [mesh.size(k) for k in step.group])
    c = pieces[0]
    full = collectives.all_gather(pad_to(local, dim, c), mesh, step.group, dim)
    if all(p == c for p in pieces):
        return full
    parts = collectives.wait(full).split(c, dim) if c else [full] * len(pieces)
    return torch.cat([x.narrow(dim, 0, p) for x, p in zip(parts, pieces)], dim)


def redistribute_local(
    local: torch.Tensor,
    mesh,
    global_shape: Sequence[int],
    src: tuple[Placement, ...],
    dst: tuple[Placement, ...],
) -> torch.Tensor:
    """This rank's shard under ``dst``, given its shard under ``src``; collective over the mesh."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # not part of the mesh: holds nothing, takes part in nothing
        return local
    local = local.resolve_conj().resolve_neg()  # collectives move raw memory: apply lazy bits first
    plan = merged_plan if collectives.can_flatten(mesh) else plan_steps
    for step in plan(tuple(src), tuple(dst)):
        logical = logical_shape(global_shape, mesh.shape, step.before, coordinate, step.mesh_dim)
        if step.group:
            local = _over_group(local, step, mesh, logical)
            continue
        n = mesh.size(step.mesh_dim)
        ctx = _Ctx(mesh, step.mesh_dim, n, coordinate[step.mesh_dim], tuple(logical))
        local = _transition(step.src, step.dst)(local, step.src, step.dst, ctx)
    return local


def local_as(x, placements: Sequence[Placement]) -> torch.Tensor:
    """A DTensor's local tensor under ``placements``, moved (and waited for) when they differ: what a
    handler computes on."""
    spec = x._spec
    placements = tuple(placements)
    if placements == spec.placements:
        return x._local_tensor
    return collectives.wait(redistribute_local(x._local_tensor, spec.mesh, spec.shape, spec.placements, placements))


@dataclass(frozen=True)
class _Ctx:
    mesh: object
    mesh_dim: int
    n: int
    index: int
    logical: tuple[int, ...]


def pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.size(dim) == size:
        return t
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.size(dim)).copy_(t)
    return out


def _trim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The first ``size`` entries along ``dim``, contiguous (local shards are always contiguous)."""
    return t if t.size(dim) == size else t.narrow(dim, 0, size).contiguous()


def _my_shard(ctx: _Ctx, dim: int) -> tuple[int, int]:
    return shard_size_and_offset(ctx.logical[dim], ctx.n, ctx.index)


def _shard_to_replicate(local, src: Shard, dst, ctx: _Ctx):
    if ctx.n == 1:
        return local
    size = ctx.logical[src.dim]
    c = chunk_size(size, ctx.n)
    full = collectives.all_gather(pad_to(local, src.dim, c), ctx.mesh, ctx.mesh_dim, src.dim)
    return _trim(full, src.dim, size)


def _partial_to_replicate(local, src: Partial, dst, ctx: _Ctx):
    if ctx.n == 1:
        return local
    return collectives.all_reduce(local, src.reduce_op, ctx.mesh, ctx.mesh_dim)


def _partial_to_shard(local, src: Partial, dst: Shard, ctx: _Ctx):
    size, _ = _my_shard(ctx, dst.dim)
    if ctx.n == 1:
        return local
    c = chunk_size(ctx.logical[dst.dim], ctx.n)
    padded = pad_to(local, dst.dim, c * ctx.n)
    out = collectives.reduce_scatter(padded, src.reduce_op, ctx.mesh, ctx.mesh_dim, dst.dim)
    return _trim(out, dst.dim, size)


def _replicate_to_shard(local, src, dst: Shard, ctx: _Ctx):
    size, offset = _my_shard(ctx, dst.dim)
    return local.narrow(dst.dim, offset, size).contiguous()


def partial_share(value: torch.Tensor, reduce_op: str, n: int) -> torch.Tensor:
    """One rank's term of a replicated value turned Partial over n ranks.

    torch's convention: a sum is split evenly; avg/max/min keep the value on every rank.
    """
    return value / n if reduce_op == "sum" and n > 1 else value


def _replicate_to_partial(local, src, dst: Partial, ctx: _Ctx):
    return partial_share(local, dst.reduce_op, ctx.n)


def _shard_to_shard(local, src: Shard, dst: Shard, ctx: _Ctx):
    if ctx.n == 1:
        return local
    d, e = src.dim, dst.dim
    cd, ce = chunk_size(ctx.logical[d], ctx.n), chunk_size(ctx.logical[e], ctx.n)
    if cd == 0 or ce == 0:  # nothing to exchange: the result is empty on every rank of the group
        shape = list(ctx.logical)
        shape[e] = _my_shard(ctx, e)[0]
        return local.new_empty(shape)
    x = pad_to(pad_to(local, d, cd), e, ce * ctx.n)
    send = torch.stack(x.split(ce, dim=e))
    received = collectives.wait(collectives.all_to_all(send, ctx.mesh, ctx.mesh_dim))
    out = torch.cat(received.unbind(0), dim=d)
    return _trim(_trim(out, d, ctx.logical[d]), e, _my_shard(ctx, e)[0])


def _identity_for(op: str, dtype: torch.dtype) -> float | int | bool:
    """The element that leaves a reduction unchanged: what other ranks contribute in S->P."""
    if op in ("sum", "avg"):
        return 0
    big = torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max
    return -big if op == "max" else big


def _shard_to_partial(local, src: Shard, dst: Partial, ctx: _Ctx):
    size, offset = _my_shard(ctx, src.dim)
    shape = list(local.shape)  # inner mesh dims may cut other tensor dims: only src.dim grows back
    shape[src.dim] = ctx.logical[src.dim]
    out = torch.full(shape, _identity_for(dst.reduce_op, local.dtype), dtype=local.dtype, device=local.device)
    out.narrow(src.dim, offset, size).copy_(local)
    return out * ctx.n if dst.reduce_op == "avg" else out


def _partial_to_partial(local, src: Partial, dst: Partial, ctx: _Ctx):
    return _replicate_to_partial(_partial_to_replicate(local, src, Replicate(), ctx), Replicate(), dst, ctx)


_TRANSITIONS: dict[tuple[type, type], Callable] = {
    (Shard, Replicate): _shard_to_replicate,
    (Shard, Shard): _shard_to_shard,
    (Shard, Partial): _shard_to_partial,
    (Partial, Replicate): _partial_to_replicate,
    (Partial, Shard): _partial_to_shard,
    (Partial, Partial): _partial_to_partial,
    (Replicate, Shard): _replicate_to_shard,
    (Replicate, Partial): _replicate_to_partial,
}


def _transition(src: Placement, dst: Placement) -> Callable:
    return _TRANSITIONS[(type(src), type(dst))]
