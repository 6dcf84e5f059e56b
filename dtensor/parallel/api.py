"""``parallelize_module``: apply a tensor-parallel plan to a module, as ``torch.distributed.tensor.parallel``."""

from __future__ import annotations

import warnings
from fnmatch import fnmatch

from torch import nn

from .style import ParallelStyle

__all__ = ["parallelize_module"]


def parallelize_module(module: nn.Module, device_mesh=None, parallelize_plan=None, *, src_data_rank: int | None = 0) -> nn.Module:
    """Cut ``module`` in place by ``parallelize_plan``: one style for the module itself, or a dict from
    submodule paths (``fnmatch`` wildcards per path component, e.g. ``"layers.*.mlp.w1"``) to styles.
    The mesh must be 1-D (slice a bigger one: ``mesh["tp"]``)."""
    if device_mesh is None:
        raise ValueError("parallelize_module needs a device_mesh (a 1-D DeviceMesh, e.g. mesh['tp'])")
    if device_mesh.ndim != 1:
        raise ValueError(f"parallelize_module takes a 1-D mesh, got {device_mesh.ndim} dims; pass a slice such as mesh['tp']")
    if parallelize_plan is None:
        warnings.warn("parallelize_module got no parallelize_plan; the module is left as it is", stacklevel=2)
        return module
    if isinstance(parallelize_plan, ParallelStyle):
        parallelize_plan.src_data_rank = src_data_rank
        return parallelize_plan._apply(module, device_mesh)
    if not isinstance(parallelize_plan, dict):
        raise TypeError(
            f"parallelize_plan must be a ParallelStyle or a dict of path -> ParallelStyle, got {type(parallelize_plan).__name__}"
        )
    for path, style in parallelize_plan.items():
        _apply_at(module, device_mesh, path, style, src_data_rank)
    return module


def _apply_at(module: nn.Module, mesh, path: str, style: ParallelStyle, src_data_rank) -> None:
    """Apply ``style`` to every submodule matching ``path``, one path component at a time."""
    if path == "":
        parallelize_module(module, mesh, style, src_data_rank=src_data_rank)
        return
    token, _, rest = path.partition(".")
    matched = [child for name, child in module.named_children() if fnmatch(name, token)]
    if not matched:
        warnings.warn(
            f"parallelize plan key {path!r}: no submodule of {type(module).__name__} matches {token!r}; entry skipped",
            stacklevel=3,
        )
    for child in matched:
        _apply_at(child, mesh, rest, style, src_data_rank)
