"""``loss_parallel``: cross-entropy on class-sharded logits, as ``torch.distributed.tensor.parallel``.

torch's DTensor gathers logits sharded on the class dim before ``log_softmax`` unless the code runs
inside ``loss_parallel()``, which swaps in kernels that keep them sharded. Ours always keeps them
sharded (``dtensor/ops/nn.py``: a max and a sum all-reduce for ``_log_softmax``, each rank picking the
targets in its class range for ``nll_loss``, the loss all-reduced to Replicate), so the context manager
changes nothing here; it exists so that code written for torch (torchtitan's ``apply_tp``, the
pytorch/examples plans) runs with one import changed and computes the same loss.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["loss_parallel"]


@contextlib.contextmanager
def loss_parallel() -> Iterator[None]:
    """Inside the block, ``F.cross_entropy`` on logits sharded on the class dim stays sharded."""
    yield
