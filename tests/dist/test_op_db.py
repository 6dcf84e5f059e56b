"""Op coverage over torch's OpInfo database, the way torch tests its own DTensor (test_dtensor_ops.py).

Every op of ``op_db`` runs on 2 ranks with its own first sample, each tensor argument sharded or
replicated (``tests/dist/opdb.py``), forward and, where the op has a gradient, backward; results must
equal the op on plain tensors and no op may take the replicate fallback, except the ones listed in
``XFAIL`` with the reason. An entry that starts to pass fails the test too, so the list stays true.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.ranks import close_pool, run_ranks

_DATA_DEPENDENT = "which output positions hold what depends on values across all shards: computed replicated"
_AS_STRIDED = "arbitrary strides over the global storage: no per-shard meaning, computed replicated"
_PLAIN_INSIDE = "the op builds a plain non-scalar tensor inside and mixes it with DTensors: refused (see docs/ops.md)"
_NO_RULE = "no sharding rule yet: runs replicated"
_NO_META = "torch 2.13 has no meta kernel for it, which planning needs: runs replicated"
_SPARSE = "sparse layouts: DTensor wraps strided tensors only"
_PLAIN_GRAD = "autograd's formula makes the gradient with a factory of sizes, so it is a plain tensor, not a DTensor"

# op name (OpInfo name[.variant]) -> why it is not sharded here. Of these, torch's DTensor has a strategy
# only for geqrf, histc, rot90, squeeze_copy, _native_batch_norm_legit, _batch_norm_with_update and
# cosine_embedding_loss (sweep(..., ours=False) over this list); those are the ones to do next.
XFAIL: dict[str, str] = {
    # values decide the layout of the output
    "argwhere": _DATA_DEPENDENT,
    "nonzero": _DATA_DEPENDENT,
    "nonzero_static": _DATA_DEPENDENT,
    "masked_select": _DATA_DEPENDENT,
    "masked_scatter": _DATA_DEPENDENT,
    "combinations": _DATA_DEPENDENT,
    "unique_consecutive": _DATA_DEPENDENT,
    "histc": "bins span the global min..max: computed replicated",
    "histogramdd": "bins span the global range: computed replicated",
    "hash_tensor": "one hash of the whole tensor: computed replicated",
    "allclose": "one bool of the whole tensor: computed replicated",
    "as_strided": _AS_STRIDED,
    "as_strided.partial_views": _AS_STRIDED,
    "as_strided_copy": _AS_STRIDED,
    "as_strided_scatter": _AS_STRIDED,
    "stft": "frames are cut with as_strided: " + _AS_STRIDED,
    "resize_": "resizes the global tensor in place: not a per-shard operation",
    "resize_as_": "resizes the global tensor in place: not a per-shard operation",
    "tensor_split": "split points given as a tensor are read on the meta planning call: refused by torch's meta kernel",
    # plain tensors made inside the op
    "__getitem__": "the sample indexes with a Python list, which torch turns into a plain tensor: " + _PLAIN_INSIDE,
    "nn.functional.fractional_max_pool2d": "random samples: " + _PLAIN_INSIDE,
    "nn.functional.fractional_max_pool3d": "random samples: " + _PLAIN_INSIDE,
    "nn.functional.scaled_dot_product_attention": "the causal mask: " + _PLAIN_INSIDE,
    "pca_lowrank": "a random projection: " + _PLAIN_INSIDE,
    "svd_lowrank": "a random projection: " + _PLAIN_INSIDE,
    "sparse.mm.reduce": _SPARSE,
    "sparse.sampled_addmm": _SPARSE,
    "to_sparse": _SPARSE,
    "geqrf": _NO_META,
    "linalg.lstsq": _NO_META,
    "linalg.lstsq.grad_oriented": _NO_META,
    # no rule yet
    "_batch_norm_with_update": _NO_RULE,
    "_native_batch_norm_legit": _NO_RULE,
    "_chunk_cat": _NO_RULE,
    "_segment_reduce.lengths": _NO_RULE,
    "_segment_reduce.offsets": _NO_RULE,
    "_unsafe_masked_index": _NO_RULE,
    "_unsafe_masked_index_put_accumulate": _NO_RULE,
    "block_diag": _NO_RULE,
    "cdist": _NO_RULE,
    "multinomial": _NO_RULE,
    "nn.functional.bilinear": _NO_RULE,
    "nn.functional.ctc_loss": _NO_RULE,
    "nn.functional.embedding_bag": _NO_RULE,
    "nn.functional.linear_cross_entropy.chunked": _NO_RULE,
    "nn.functional.multi_margin_loss": _NO_RULE,
    "nn.functional.multilabel_margin_loss": _NO_RULE,
    "nn.functional.pdist": _NO_RULE,
    "nn.functional.prelu": _NO_RULE,
    "nn.functional.rrelu": _NO_RULE,
    "put": _NO_RULE,
    "rot90": _NO_RULE,
    "squeeze_copy": _NO_RULE,
    "take": _NO_RULE,
    # known bugs
    "native_group_norm": "bug: its backward adds a Shard into a Partial(sum) in place",
    "nn.functional.cosine_embedding_loss": "bug: sqrt_ in place on a Partial(sum)",
    "max_pool2d_with_indices_backward": _PLAIN_GRAD,
    "sgn": _PLAIN_GRAD + " (_efficientzerotensor, the derivative of sgn of real numbers)",
    "repeat": _PLAIN_GRAD + " (zeros of the input's size, for an empty input)",
    "nn.functional.linear_cross_entropy.chunked_none": _PLAIN_GRAD,
    "linalg.householder_product": "bug: wrong gradient",
    "ormqr": "bug: wrong gradient",
    "short": "gloo has no int16 collectives ('Invalid scalar type' when the comparison gathers the result)",
}


PARTS = 8  # the sweep runs as this many tests, each well inside the per-test timeout on a busy machine
POOL = "op_db"  # its own worker processes: hundreds of native kernels run there, none of our I/O


@pytest.fixture(scope="module", autouse=True)
def _own_workers():
    yield
    close_pool(2, POOL)


def _sweep(part: int):
    from tests.dist.opdb import sweep
    from tests.ranks import mesh

    start = time.process_time()
    return sweep(mesh((2,)), part=(part, PARTS)), time.process_time() - start


@pytest.mark.parametrize("part", range(PARTS))
def test_op_db_ops_shard_forward_and_backward(part):
    (times, cpu), (other, _) = run_ranks(2, _sweep, part, timeout=280, pool=POOL)
    outcomes = {k: v[0] for k, v in times.items()}
    assert outcomes == {k: v[0] for k, v in other.items()}, "ranks disagree"
    kinds = Counter("xfail" if k in XFAIL else v.split(":")[0] for k, v in outcomes.items())
    slow = sorted(times, key=lambda k: -times[k][1])[:3]
    print(
        f"\nop_db part {part + 1}/{PARTS} on 2 ranks: {kinds['sharded']} sharded, {kinds['fallback']} fallback, "
        f"{kinds['xfail']} xfail, {kinds['n/a']} not applicable; {sum(v[1] for v in times.values()):.1f}s "
        f"({cpu:.1f}s CPU on rank 0), slowest: {', '.join(f'{k} {times[k][1]:.2f}s' for k in slow)}"
    )
    unexpected = {k: v for k, v in outcomes.items() if k not in XFAIL and v != "sharded" and not v.startswith("n/a")}
    assert not unexpected, "ops that do not shard and are not in XFAIL:\n" + "\n".join(f"{k}: {v}" for k, v in sorted(unexpected.items()))
    fixed = sorted(k for k in XFAIL if outcomes.get(k) == "sharded")
    assert not fixed, f"ops in XFAIL that now shard (remove them from the list): {fixed}"


def test_xfail_names_ops_of_op_db():
    """Every XFAIL entry names an op the sweep runs (a renamed op would otherwise hide)."""
    from tests.dist.opdb import op_key, ops_to_run

    assert not sorted(set(XFAIL) - {op_key(op) for op, _ in ops_to_run()})
