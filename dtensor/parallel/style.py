"""Tensor-parallel styles, mirroring ``torch.distributed.tensor.parallel.style`` on our DTensor.

A style says how one submodule is cut: a partition function for its parameters, and how its inputs
and outputs are laid out (a forward pre-hook and a forward hook, through ``distribute_module``).

=================  ==========================  ===========================  ========  ===============
style              Linear weight / bias        Embedding weight             input     output
=================  ==========================  ===========================  ========  ===============
ColwiseParallel    Shard(0) / Shard(0)         Shard(1)                     R         Shard(-1)
RowwiseParallel    Shard(1) / Replicate        Shard(0) (vocab parallel)    S(-1)/R   P -> Replicate
SequenceParallel   every parameter replicated (from local data)            Shard(1)  Shard(1)
=================  ==========================  ===========================  ========  ===============
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..api import DTensor, distribute_tensor
from ..convert import _placement_from_torch
from ..module import distribute_module
from ..placements import Placement, PlacementError, Replicate, Shard

__all__ = [
    "ParallelStyle",
    "ColwiseParallel",
    "RowwiseParallel",
    "SequenceParallel",
    "PrepareModuleInput",
    "PrepareModuleOutput",
    "PrepareModuleInputOutput",
]


def _placement(p):
    """Ours as given; torch's ``Shard``/``Replicate``/``Partial`` converted, so torch plans run unchanged."""
    return p if p is None or isinstance(p, Placement) else _placement_from_torch(p)


class ParallelStyle(ABC):
    """How ``parallelize_module`` cuts one submodule; ``_apply`` does it in place."""

    src_data_rank: int | None = 0

    @abstractmethod
    def _apply(self, module: nn.Module, device_mesh) -> nn.Module: ...


def _as_dtensor(x: Any, mesh, layout: Placement, desired: Placement | None = None) -> DTensor:
    """A module input as a DTensor: a plain tensor is this rank's piece under ``layout``; a DTensor is
    moved to ``desired`` when it is laid out otherwise."""
    if not isinstance(x, DTensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a module input to be a torch.Tensor or DTensor, got {type(x).__name__}")
        x = DTensor.from_local(x, mesh, (layout,), run_check=False)
    if desired is not None and x.placements != x._spec.with_placements((desired,)).placements:
        x = x.redistribute(placements=(desired,), async_op=True)
    return x


def _finish(outputs: DTensor, layout: Placement, use_local_output: bool):
    """A module output moved to ``layout``, and unwrapped when the style says so."""
    if outputs.placements != (layout,):
        outputs = outputs.redistribute(placements=(layout,), async_op=True)
    return outputs.to_local() if use_local_output else outputs


def _shard_parameters(module: nn.Module, mesh, placement_of: dict[str, Placement], src_data_rank) -> None:
    """Replace the module's own parameters named in ``placement_of`` by DTensor parameters."""
    for name, param in list(module.named_parameters(recurse=False)):
        if name in placement_of and not isinstance(param, DTensor):
            dt = distribute_tensor(param.data, mesh, [placement_of[name]], src_data_rank=src_data_rank)
            module.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))


class _LinearOrEmbedding(ParallelStyle):
    """Shared by Colwise and Rowwise: per module type, parameter placements and the wanted input."""

    _LINEAR: dict[str, Placement]
    _EMBEDDING: dict[str, Placement]
    _DEFAULT_INPUT: Placement
    _DEFAULT_OUTPUT: Placement

    def __init__(
        self,
        *,
        input_layouts: Placement | None = None,
        output_layouts: Placement | None = None,
        use_local_output: bool = True,
    ):
        self.input_layouts = (_placement(input_layouts) or self._DEFAULT_INPUT,)
        self.output_layouts = (_placement(output_layouts) or self._DEFAULT_OUTPUT,)
        self.use_local_output = use_local_output

    def _plan_for(self, module: nn.Module) -> tuple[dict[str, Placement], Placement]:
        """(parameter placements, desired input layout) for this module type."""
        raise NotImplementedError

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        placements, desired = self._plan_for(module)
        layout, out_layout, local = self.input_layouts[0], self.output_layouts[0], self.use_local_output

        def partition(name, mod, mesh):
            if mod is module:
                _shard_parameters(mod, mesh, placements, self.src_data_rank)

        def input_fn(mod, inputs, mesh):
            return (_as_dtensor(inputs[0], mesh, layout, desired), *inputs[1:])

        def output_fn(mod, outputs, mesh):
            return _finish(outputs, out_layout, local)

        return distribute_module(module, device_mesh, partition, input_fn, output_fn)

    def _unsupported(self, module: nn.Module):
        return NotImplementedError(f"{type(self).__name__} supports nn.Linear and nn.Embedding, got {type(module).__name__}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_layouts={self.input_layouts}, output_layouts={self.output_layouts}, "
            f"use_local_output={self.use_local_output})"
        )


class ColwiseParallel(_LinearOrEmbedding):
    """Cut the output features: Linear weight and bias Shard(0), Embedding weight Shard(1). The input is
    replicated; the output is sharded on its last dim (a plain local tensor by default)."""

    _DEFAULT_INPUT = Replicate()
    _DEFAULT_OUTPUT = Shard(-1)

    def _plan_for(self, module):
        if isinstance(module, nn.Linear):
            return {"weight": Shard(0), "bias": Shard(0)}, Replicate()
        if isinstance(module, nn.Embedding):
            return {"weight": Shard(1)}, Replicate()
        raise self._unsupported(module)


class RowwiseParallel(_LinearOrEmbedding):
    """Cut the input features: Linear weight Shard(1) and bias Replicate, input sharded on its last dim;
    Embedding weight Shard(0) (vocab parallel), input replicated. The output is a pending sum, made
    Replicate by default."""

    _DEFAULT_INPUT = Shard(-1)
    _DEFAULT_OUTPUT = Replicate()

    def _plan_for(self, module):
        if isinstance(module, nn.Linear):
            return {"weight": Shard(1), "bias": Replicate()}, Shard(-1)
        if isinstance(module, nn.Embedding):
            return {"weight": Shard(0)}, Replicate()
        raise self._unsupported(module)


class SequenceParallel(ParallelStyle):
    """Run a norm or dropout on input sharded along ``sequence_dim``; its parameters are replicated from
    each rank's local values (they must agree, as with torch: LayerNorm's ones/zeros init does)."""

    def __init__(self, *, sequence_dim: int = 1, use_local_output: bool = False):
        self.sequence_sharding = (Shard(sequence_dim),)
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        shard, local = self.sequence_sharding[0], self.use_local_output

        def partition(name, mod, mesh):
            for p_name, param in list(mod.named_parameters(recurse=False)):
                dt = DTensor.from_local(param.detach(), mesh, [Replicate()], run_check=False)
                mod.register_parameter(p_name, nn.Parameter(dt, requires_grad=param.requires_grad))

        def input_fn(mod, inputs, mesh):
            return (_as_dtensor(inputs[0], mesh, shard, shard), *inputs[1:])

        def output_fn(mod, outputs, mesh):
            return outputs.to_local() if local else outputs

        return distribute_module(module, device_mesh, partition, input_fn, output_fn)

    def __repr__(self) -> str:
        return f"SequenceParallel(sequence_dim={self.sequence_sharding[0].dim}, use_local_output={self.use_local_output})"


def _layouts(value) -> tuple | None:
    """One placement or a sequence of them (None entries kept) as a tuple of ours."""
    if value is None:
        return None
    return tuple(_placement(p) for p in (value if isinstance(value, (tuple, list)) else (value,)))


def _same_length(style: str, name: str, layouts, desired) -> None:
    """torch's check (and its words, which its tests match) that every layout has a desired one."""
    if layouts is not None and len(layouts) != len(desired or ()):
        raise PlacementError(
            f"{style}: {name} and desired_{name} should have same length! Got {len(layouts)} layouts "
            f"{layouts} and {len(desired or ())} desired {desired}; give one desired layout (or None) per layout"
        )


def _count_matches(style: str, what: str, name: str, values, layouts) -> None:
    if len(values) != len(layouts):
        raise ValueError(
            f"{style}: module {what} and {name} should have same length! The module got {len(values)} {what}, "
            f"{name} has {len(layouts)} entries; give one layout (or None) per {what[:-1]}"
        )


class PrepareModuleInput(ParallelStyle):
    """Annotate positional inputs (and keyword inputs) with layouts and move them to desired ones;
    ``None`` leaves an input as it is."""

    def __init__(
        self,
        *,
        input_layouts=None,
        desired_input_layouts=None,
        input_kwarg_layouts: dict[str, Placement] | None = None,
        desired_input_kwarg_layouts: dict[str, Placement] | None = None,
        use_local_output: bool = False,
    ):
        self.input_layouts = _layouts(input_layouts)
        self.desired_input_layouts = _layouts(desired_input_layouts)
        _same_length("PrepareModuleInput", "input_layouts", self.input_layouts, self.desired_input_layouts)
        self.input_kwarg_layouts = {k: _placement(v) for k, v in (input_kwarg_layouts or {}).items()}
        self.desired_input_kwarg_layouts = {k: _placement(v) for k, v in (desired_input_kwarg_layouts or {}).items()}
        if input_kwarg_layouts is not None:
            _same_length("PrepareModuleInput", "input_kwarg_layouts", self.input_kwarg_layouts, self.desired_input_kwarg_layouts)
        self.use_local_output = use_local_output

    def _prepare(self, x, mesh, layout, desired):
        if layout is None:
            return x
        dt = _as_dtensor(x, mesh, layout, desired)
        return dt.to_local() if self.use_local_output else dt

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def pre_hook(mod, args, kwargs):
            if self.input_layouts is not None:
                _count_matches("PrepareModuleInput", "inputs", "input_layouts", args, self.input_layouts)
                pairs = zip(args, self.input_layouts, self.desired_input_layouts)
                prepared = tuple(self._prepare(a, device_mesh, layout, want) for a, layout, want in pairs)
                args = prepared + tuple(args[len(prepared) :])
            for key, layout in self.input_kwarg_layouts.items():
                if key in kwargs:
                    kwargs[key] = self._prepare(kwargs[key], device_mesh, layout, self.desired_input_kwarg_layouts.get(key))
            return args, kwargs

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return module


class PrepareModuleOutput(ParallelStyle):
    """Annotate the module's outputs with layouts and move them to desired ones."""

    def __init__(self, *, output_layouts, desired_output_layouts, use_local_output: bool = True):
        self.output_layouts = _layouts(output_layouts)
        self.desired_output_layouts = _layouts(desired_output_layouts)
        _same_length("PrepareModuleOutput", "output_layouts", self.output_layouts, self.desired_output_layouts)
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def hook(mod, inputs, outputs):
            single = not isinstance(outputs, tuple)
            outs = (outputs,) if single else outputs
            _count_matches("PrepareModuleOutput", "outputs", "output_layouts", outs, self.output_layouts)
            done = []
            for out, layout, desired in zip(outs, self.output_layouts, self.desired_output_layouts):
                if layout is not None:
                    out = _finish(_as_dtensor(out, device_mesh, layout), desired, self.use_local_output)
                done.append(out)
            return done[0] if single else tuple(done)

        module.register_forward_hook(hook)
        return module


class PrepareModuleInputOutput(ParallelStyle):
    """``PrepareModuleInput`` and ``PrepareModuleOutput`` on one module, in one plan entry (a plan dict
    holds one style per path). ``use_local_input`` is the input side's ``use_local_output``."""

    def __init__(
        self,
        *,
        input_layouts=None,
        desired_input_layouts=None,
        input_kwarg_layouts: dict[str, Placement] | None = None,
        desired_input_kwarg_layouts: dict[str, Placement] | None = None,
        use_local_input: bool = False,
        output_layouts,
        desired_output_layouts,
        use_local_output: bool = True,
    ):
        self.prepare_module_input = PrepareModuleInput(
            input_layouts=input_layouts,
            desired_input_layouts=desired_input_layouts,
            input_kwarg_layouts=input_kwarg_layouts,
            desired_input_kwarg_layouts=desired_input_kwarg_layouts,
            use_local_output=use_local_input,
        )
        self.prepare_module_output = PrepareModuleOutput(
            output_layouts=output_layouts, desired_output_layouts=desired_output_layouts, use_local_output=use_local_output
        )

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        self.prepare_module_input._apply(module, device_mesh)
        return self.prepare_module_output._apply(module, device_mesh)
