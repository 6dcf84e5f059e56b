"""``CommDebugMode`` that also counts the collectives our DTensor's ops issue.

torch's ``CommDebugMode`` lets only torch's own DTensor run an op below the mode; for any other tensor
subclass it runs the op with the mode switched off, so collectives issued inside our
``__torch_dispatch__`` would go uncounted. Deferring to our DTensor (``NotImplemented``) makes them
visible. Use it exactly like torch's: ``with CommDebugMode() as comm: ...; comm.get_comm_counts()``.
"""

from __future__ import annotations

from torch.distributed.tensor.debug import CommDebugMode as _TorchCommDebugMode

from .api import DTensor

__all__ = ["CommDebugMode"]


class CommDebugMode(_TorchCommDebugMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        return super().__torch_dispatch__(func, types, args, kwargs)
