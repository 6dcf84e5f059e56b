"""``dtensor.debug``: the counterpart of ``torch.distributed.tensor.debug``.

``CommDebugMode`` also counts the collectives our DTensor's ops issue. torch's lets only torch's own
DTensor run an op below the mode; for any other tensor subclass it runs the op with the mode switched
off, so collectives issued inside our ``__torch_dispatch__`` would go uncounted. Deferring to our DTensor
(``NotImplemented``) makes them visible. Use it exactly like torch's: ``with CommDebugMode() as comm:
...; comm.get_comm_counts()``.

``visualize_sharding`` prints which ranks hold which rows and columns of a 1-D or 2-D DTensor.
"""

from __future__ import annotations

from torch.distributed.tensor.debug import CommDebugMode as _TorchCommDebugMode

from .api import DTensor
from .placements import mesh_coordinates

__all__ = ["CommDebugMode", "visualize_sharding"]


class CommDebugMode(_TorchCommDebugMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        return super().__torch_dispatch__(func, types, args, kwargs)


def visualize_sharding(dtensor, header: str = "", use_rich: bool = False) -> None:
    """Print, on the rank at coordinate 0 of every mesh dim, a table of the ranks holding each block
    (``Row a-b`` by ``Col c-d``, inclusive; a 1-D tensor is one column), as torch's prints it with
    ``tabulate``; other ranks, ranks outside the mesh and empty tensors print nothing. The table is
    drawn here, so neither ``tabulate`` nor ``rich`` is needed (torch raises without them): ``use_rich``
    changes nothing, and ``header`` is accepted and not printed, as in torch 2.13."""
    if dtensor.numel() == 0:
        return
    if dtensor.dim() >= 3:
        raise RuntimeError("visualize sharding supports only 1D or 2D DTensor")
    mesh = dtensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None or any(coordinate):
        return
    ranks = mesh.mesh.flatten().tolist()
    blocks = [(*_rows_and_cols(dtensor._spec.box_at(c)), rank) for c, rank in zip(mesh_coordinates(mesh.shape), ranks)]
    print(_table(blocks, mesh.device_type))


def _rows_and_cols(box) -> tuple[tuple[int, int], tuple[int, int]]:
    """A block's first and last row and column (a 1-D tensor's block is column 0-0)."""
    offsets, sizes = (*box.offsets, 0), (*box.sizes, 1)
    return (offsets[0], offsets[0] + sizes[0] - 1), (offsets[1], offsets[1] + sizes[1] - 1)


def _table(blocks: list, device_type: str) -> str:
    """``tabulate``'s plain ("simple") table of the blocks: one row per row range, one column per column
    range, each cell ``cpu:0,2`` (the ranks holding it, in mesh order)."""
    rows = sorted({b[0] for b in blocks})
    cols = sorted({b[1] for b in blocks})
    cells = [["" for _ in cols] for _ in rows]
    for row, col, rank in blocks:
        i, j = rows.index(row), cols.index(col)
        cells[i][j] += f",{rank}" if cells[i][j] else f"{device_type}:{rank}"
    header = [""] + [f"Col {a}-{b}" for a, b in cols]
    body = [[f"Row {a}-{b}"] + line for (a, b), line in zip(rows, cells)]
    widths = [max(len(h) + 2, *(len(r[k]) for r in body)) for k, h in enumerate(header)]  # tabulate pads headers by 2
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in lines)
