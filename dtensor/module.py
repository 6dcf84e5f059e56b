"""``distribute_module``: turn a module's parameters and buffers into DTensors, with torch's semantics.

``partition_fn(name, submodule, mesh)`` runs on every submodule (``named_modules`` order) and may
register DTensor parameters of its choosing; whatever it leaves as a plain tensor is then replicated.
``input_fn(module, inputs, mesh)`` and ``output_fn(module, outputs, mesh)`` become a forward pre-hook
and a forward hook of the root module.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from .api import DTensor, distribute_tensor
from .placements import Replicate

__all__ = ["distribute_module"]


def distribute_module(
    module: nn.Module,
    device_mesh=None,
    partition_fn: Callable[[str, nn.Module, Any], None] | None = None,
    input_fn: Callable[[nn.Module, Any, Any], Any] | None = None,
    output_fn: Callable[[nn.Module, Any, Any], Any] | None = None,
) -> nn.Module:
    """Distribute ``module`` over ``device_mesh`` in place and return it (callable once per module)."""
    if getattr(module, "_distribute_module_applied", False):
        raise RuntimeError(
            f"distribute_module was already applied to this {type(module).__name__}; "
            "call it once per module (combine the partition functions instead)"
        )
    if device_mesh is None:
        raise ValueError("distribute_module needs a device_mesh")
    for name, submodule in module.named_modules():
        if partition_fn is not None:
            partition_fn(name, submodule, device_mesh)
        _replicate_the_rest(submodule, device_mesh)
    if input_fn is not None:
        _check_arity("input_fn", input_fn)
        module.register_forward_pre_hook(lambda mod, inputs: input_fn(mod, inputs, device_mesh))
    if output_fn is not None:
        _check_arity("output_fn", output_fn)
        module.register_forward_hook(lambda mod, inputs, outputs: output_fn(mod, outputs, device_mesh))
    module._distribute_module_applied = True
    return module


def _replicate_the_rest(module: nn.Module, mesh) -> None:
    """Every direct parameter and buffer that is not a DTensor yet becomes a replicated one."""
    replicate = [Replicate()] * mesh.ndim
    for key, param in module._parameters.items():
        if param is not None and not isinstance(param, DTensor):
            dt = distribute_tensor(param.data, mesh, replicate)
            module.register_parameter(key, nn.Parameter(dt, requires_grad=param.requires_grad))
    for key, buffer in module._buffers.items():
        if buffer is not None and not isinstance(buffer, DTensor):
            module._buffers[key] = distribute_tensor(buffer, mesh, replicate)


def _check_arity(what: str, fn: Callable) -> None:
    count = len(inspect.signature(fn).parameters)
    if count != 3:
        raise ValueError(
            f"distribute_module: {what} must take (module, {'inputs' if what == 'input_fn' else 'outputs'}, "
            f"device_mesh), got a function of {count} arguments"
        )
