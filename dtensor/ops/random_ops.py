"""Random ops on DTensors (handlers): the numbers do not depend on the mesh.

Every op draws one seed from torch's generator (the same on every rank, so repeated calls differ and
``torch.manual_seed`` reproduces them) and fills each element from a counter-based hash of
(seed, its global flat index) (``dtensor/random.py``). Each rank computes only its own box: shards
differ, replicas agree, and the full tensor is the same whatever the mesh and placements, on CPU and
GPU. The values differ from torch's own generators; only their distributions match.

Partial inputs: ops that read their input's values reduce it first (``bernoulli`` of probabilities),
except ``native_dropout``, which is linear in its input given the mask and so keeps Partial. Out-of-place
results are never Partial. An in-place fill of a Partial target writes the values as terms: one rank holds
them and the others zeros under ``sum``, every rank holds them under avg/max/min.
"""

from __future__ import annotations

import torch

from .. import collectives, random
from ..placements import Box, Placement, Replicate
from ..redistribute import redistribute_local
from ..spec import DTensorSpec
from .common import bind_args, replicate_partials

aten = torch.ops.aten


def _box(spec: DTensorSpec) -> Box:
    return spec.local_box() or Box((0,) * len(spec.shape), (0,) * len(spec.shape))


def _unit(seed: int, spec: DTensorSpec, device, dtype=torch.float64) -> torch.Tensor:
    """This rank's box of a global U[0, 1) tensor shaped like ``spec``."""
    return random.uniform(seed, spec.shape, _box(spec), dtype, device)


def _normal(seed: int, spec: DTensorSpec, device) -> torch.Tensor:
    return random.normal(seed, spec.shape, _box(spec), torch.float64, device)


def _reduced(dt, placements: tuple[Placement, ...]) -> torch.Tensor:
    """The local tensor of ``dt`` laid out as ``placements`` (a collective when it must move)."""
    spec = dt._spec
    if spec.placements == placements:
        return dt._local_tensor
    return collectives.wait(redistribute_local(dt._local_tensor, spec.mesh, spec.shape, spec.placements, placements))


def _probabilities(p, spec: DTensorSpec, cls) -> torch.Tensor:
    """``p`` (a number, tensor or DTensor broadcastable to ``spec``) on this rank's box of ``spec``."""
    if not isinstance(p, torch.Tensor):
        return torch.tensor(p, dtype=torch.float64)
    if isinstance(p, cls) and p._spec.shape == spec.shape:
        return _reduced(p, replicate_partials(spec.placements))
    if isinstance(p, cls):
        p = _reduced(p, tuple(Replicate() for _ in p._spec.placements))
    box = _box(spec)
    return p.expand(spec.shape)[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]


def _as_terms(values: torch.Tensor, spec: DTensorSpec) -> torch.Tensor:
    """Values of the logical tensor written as this rank's term of its Partial placements."""
    coordinate = spec.mesh.get_coordinate()
    for mesh_dim, p in enumerate(spec.placements):
        if p.is_partial("sum") and coordinate is not None and coordinate[mesh_dim] != 0:
            return torch.zeros_like(values)
    return values


def _new(cls, local: torch.Tensor, like: DTensorSpec, placements, dtype: torch.dtype):
    return cls(local, DTensorSpec.create(like.mesh, placements, like.shape, dtype), requires_grad=False)


# In-place fills: ``values(bound, spec, seed, device, cls)`` gives the target's new local values.


def _uniform_values(a, spec, seed, device, cls):
    return a["from"] + (a["to"] - a["from"]) * _unit(seed, spec, device, spec.dtype).double()


def _normal_values(a, spec, seed, device, cls):
    return a["mean"] + a["std"] * _normal(seed, spec, device)


# Other distributions by inverse transform of the same uniform (or normal) draws, as torch's CPU kernels.
def _cauchy_values(a, spec, seed, device, cls):
    return a["median"] + a["sigma"] * torch.tan(torch.pi * (_unit(seed, spec, device) - 0.5))


def _exponential_values(a, spec, seed, device, cls):
    return -torch.log1p(-_unit(seed, spec, device)) / a["lambd"]


def _geometric_values(a, spec, seed, device, cls):
    return torch.ceil(torch.log1p(-_unit(seed, spec, device)) / torch.log1p(torch.tensor(-a["p"], dtype=torch.float64)))


def _log_normal_values(a, spec, seed, device, cls):
    return torch.exp(a["mean"] + a["std"] * _normal(seed, spec, device))


def _bernoulli_values(a, spec, seed, device, cls):
    return _unit(seed, spec, device) < _probabilities(a["p"], spec, cls).to(device)


def _fill(values):
    def handler(cls, func, args, kwargs):
        a = bind_args(func, args, kwargs)
        target = a["self"]
        spec = target._spec
        local = target._local_tensor
        seed = random.draw_seed(a.get("generator"))  # on every rank, so generators stay in step
        if spec.mesh.get_coordinate() is None:  # not part of the mesh: holds nothing
            return target
        new = values(a, spec, seed, local.device, cls)
        local.copy_(_as_terms(new.to(local.dtype), spec))
        return target

    return handler


# Out-of-place ops.


def _like(draw):
    """``rand_like``-style factories: laid out like the input (never Partial), values from ``draw``."""

    def handler(cls, func, args, kwargs):
        a = bind_args(func, args, kwargs)
        src = a["self"]._spec
        dtype = a.get("dtype") or src.dtype
        spec = DTensorSpec.create(src.mesh, replicate_partials(src.placements), src.shape, dtype)
        device = a["self"]._local_tensor.device
        local = draw(a, spec, random.draw_seed(a.get("generator")), device).to(dtype)
        return cls(local, spec, requires_grad=False)

    return handler


def _randint(a, spec, seed, device):
    low, high = a.get("low") or 0, a["high"]
    if isinstance(high, torch.Tensor):
        high = int(high.item())
    return torch.floor(low + (high - low) * _unit(seed, spec, device))


def _normal_of_tensors(cls, func, args, kwargs):
    """``normal`` with a tensor mean and/or std: ``mean + std * z``, ``z`` standard normal drawn like
    ``randn_like`` over the broadcast shape, as DTensor ops (any layout of the two works)."""
    a = bind_args(func, args, kwargs)
    mean, std = a["mean"], a["std"]
    like = mean if isinstance(mean, cls) else std
    shape = torch.broadcast_shapes(*[t.shape for t in (mean, std) if isinstance(t, torch.Tensor)])
    base, generator = aten.expand.default(like, list(shape)), a.get("generator")
    z = aten.randn_like.default(base) if generator is None else aten.randn_like.generator(base, generator=generator)
    return aten.add.Tensor(aten.mul.Tensor(z, std) if isinstance(std, torch.Tensor) else aten.mul.Scalar(z, std), mean)


def _bernoulli(cls, func, args, kwargs):
    """``bernoulli.p`` (probability p) and ``bernoulli.default`` (the input holds the probabilities)."""
    a = bind_args(func, args, kwargs)
    src = a["self"]._spec
    placements = replicate_partials(src.placements)
    spec = src.with_placements(placements)
    device = a["self"]._local_tensor.device
    p = a["p"] if "p" in a else a["self"]
    mask = _unit(random.draw_seed(a.get("generator")), spec, device) < _probabilities(p, spec, cls).to(device)
    return _new(cls, mask.to(src.dtype), src, placements, src.dtype)


def _native_dropout(cls, func, args, kwargs):
    """(input * mask / (1 - p), mask); the output keeps the input's placements (Partial too: the op is
    linear in its input given the mask), the mask drops Partial."""
    a = bind_args(func, args, kwargs)
    x = a["input"]
    spec = x._spec
    local = x._local_tensor
    mask_placements = replicate_partials(spec.placements)
    if a["train"] is False:
        out, mask = local.clone(), torch.ones_like(local, dtype=torch.bool)
    else:
        keep = 1.0 - a["p"]
        mask = _unit(random.draw_seed(), spec.with_placements(mask_placements), local.device) < keep
        out = local * mask * (0.0 if keep == 0 else 1.0 / keep)
    return _new(cls, out, spec, spec.placements, spec.dtype), _new(cls, mask, spec, mask_placements, torch.bool)


HANDLERS = {
    aten.uniform_.default: _fill(_uniform_values),
    aten.normal_.default: _fill(_normal_values),
    aten.cauchy_.default: _fill(_cauchy_values),
    aten.exponential_.default: _fill(_exponential_values),
    aten.geometric_.default: _fill(_geometric_values),
    aten.log_normal_.default: _fill(_log_normal_values),
    aten.bernoulli_.float: _fill(_bernoulli_values),
    aten.bernoulli_.Tensor: _fill(_bernoulli_values),
    aten.bernoulli.p: _bernoulli,
    aten.bernoulli.default: _bernoulli,
    aten.native_dropout.default: _native_dropout,
    aten.normal.Tensor_Tensor: _normal_of_tensors,
    aten.normal.Tensor_float: _normal_of_tensors,
    aten.normal.float_Tensor: _normal_of_tensors,
    aten.rand_like.default: _like(lambda a, spec, seed, device: _unit(seed, spec, device, spec.dtype)),
    aten.rand_like.generator: _like(lambda a, spec, seed, device: _unit(seed, spec, device, spec.dtype)),
    aten.randn_like.default: _like(lambda a, spec, seed, device: _normal(seed, spec, device)),
    aten.randn_like.generator: _like(lambda a, spec, seed, device: _normal(seed, spec, device)),
    aten.randint_like.default: _like(_randint),
    aten.randint_like.low_dtype: _like(_randint),
    aten.randint_like.Tensor: _like(_randint),
}
RULES: dict = {}
