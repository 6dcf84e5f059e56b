"""Linear algebra over batch dims: one rule for every ``linalg`` kernel (solve, inverse, decompositions,
determinants, eigen- and singular values, pseudo-inverses ...). ``geqrf`` and ``linalg_lstsq`` have no
meta kernel in torch 2.13 (the planning call needs one): they fall back.

Each such kernel works on the last one or two dims of each input (a matrix, a vector of pivots or of
Householder coefficients, a 0-d error code) and treats the leading dims as a batch: each batch entry
alone and alike, the inputs' batch dims broadcast against each other, and every output starts with the
broadcast batch dims. So a shard of a batch dim stays where it is (every rank solves its own systems),
while the matrix dims are replicated first. The table below gives, per op, how many trailing "core" dims
each tensor argument has; the choice among batch layouts is the elementwise chooser's
(``common.elementwise``) run over the inputs' batch shapes. No ``Partial`` survives (these are not
linear).

A kernel that raises on bad input (a singular matrix) raises on the ranks holding that batch entry
only; the others go on to their next collective, which then fails after the process group's timeout.
"""

from __future__ import annotations

import torch

from ..dispatch import Strategy
from .common import Operand, bind_args, elementwise

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS"]


def _solve_rhs_core(named: dict) -> int:
    """``linalg.solve``'s right side is a batch of vectors when it is 1-D or A's shape minus the last dim."""
    a, b = named["A"], named["B"]
    vector = b.dim() == 1 or (b.dim() == a.dim() - 1 and tuple(b.shape) == tuple(a.shape[:-1]))
    return 1 if vector else 2


def _batched(*cores):
    """The rule of a kernel whose tensor arguments (schema order) have ``cores`` trailing core dims each;
    an entry may be a function of the named arguments (``linalg.solve``'s vector or matrix right side)."""

    def rule(func, specs, args, kwargs):
        from ..api import DTensor  # plain 0-d tensors (pinv's tolerances) are scalars: not planned

        named = bind_args(func, args, kwargs)
        tensors = [a.name for a in func._schema.arguments if "Tensor" in str(a.type)]
        given = [(named[n], k) for n, k in zip(tensors, cores) if isinstance(named.get(n), DTensor)]
        if len(given) != len(specs):
            return None
        operands = []
        for spec, (_, core) in zip(specs, given):
            k = core(named) if callable(core) else core
            operands.append(Operand(spec, tuple(spec.shape[: len(spec.shape) - k])))
        choice = elementwise(tuple(operands))
        return Strategy(choice.dtensor_inputs(), choice.output)

    return rule


_M, _V = 2, 1  # a matrix, a vector per batch entry

_TABLE = {
    "_linalg_check_errors": (0,),
    "linalg_solve_triangular": (_M, _M),
    "triangular_solve": (_M, _M),
    "_linalg_solve_ex": (_M, _solve_rhs_core),
    "linalg_lu_solve": (_M, _V, _M),
    "lu_unpack": (_M, _V),
    "linalg_inv_ex": (_M,),
    "linalg_cholesky_ex": (_M,),
    "cholesky": (_M,),
    "cholesky_inverse": (_M,),
    "cholesky_solve": (_M, _M),
    "linalg_ldl_factor_ex": (_M,),
    "linalg_ldl_solve": (_M, _V, _M),
    "linalg_lu": (_M,),
    "linalg_lu_factor_ex": (_M,),
    "linalg_qr": (_M,),
    "linalg_householder_product": (_M, _V),
    "ormqr": (_M, _V, _M),
    "_linalg_svd": (_M,),
    "_linalg_eigh": (_M,),
    "linalg_eig": (_M,),
    "_linalg_det": (_M,),
    "_linalg_slogdet": (_M,),
    "linalg_matrix_exp": (_M,),
    "linalg_pinv": (_M, 0, 0),
}


def _overloads(name: str) -> list:
    packet = getattr(aten, name)
    return [getattr(packet, o) for o in packet.overloads() if "out" not in o]


RULES = {op: _batched(*cores) for name, cores in _TABLE.items() for op in _overloads(name)}
HANDLERS: dict = {}
