"""Record-time rewrites: a pattern of calls recorded as one node that batches better.

NOTE [stacked sums]: ``torch.stack(xs).sum()`` (a tree's node losses) and
``torch.stack(xs).sum(0)`` (a Child-Sum cell's children) are as common in per-example code
as they are hard on batching: the stack's signature names ``len(xs)``, so every length
makes its own pair of batches (58 to 68 of the 80 to 94 batches of an SST Tree-LSTM
training step were such stacks and sums, one pair per tree size). When ``sum`` is
recorded on a pending stack of same-shaped tensors, the sum is recorded instead as one
``stacked_sum(xs, all_dims)`` node whose signature leaves the length out; the executor
computes a whole batch of them as one gather of every member and one ``index_add`` by
node. The stack node stays in the graph: if nothing else reads it, it never runs (NOTE
[dead code] in execute.py). When the stack is the node just before the sum (the code
reads ``torch.stack(xs).sum()``), nothing else reads it yet, and the two swap places:
the stack then reads only the sum, which runs after every member, so each member keeps
one user instead of two for the scheduler (agenda scheduling of an SST blocks step:
5.91 -> 5.37 ms). The sum differs from eager's only in the order of its additions
(rounding: for n float32 terms, at most about n * 2**-24 times the sum of their
magnitudes); its gradient is exact.
"""
from __future__ import annotations

import torch

from .lazy import LazyTensor
from .signature import GLOBAL_SIGNATURES, OP, Signature, autograd_mode

SEGMENT_SUM = "segment-sum"     # Signature.direct[0] of stacked_sum: the executor's cue

_torch_stack = torch.stack
_SCALAR = torch.Size([])
# float16 and bfloat16 sums accumulate in float32 in eager code but not in index_add
_SUMMABLE = (torch.float32, torch.float64)


def _is_zero(dim) -> bool:
    return type(dim) is int and dim == 0     # never compares a lazy tensor: that records


def stacked_sum(xs, all_dims: bool):
    """What the rewritten node means, for one example (the executor's per-example rerun
    of a failing batch calls it)."""
    stacked = torch.stack(xs)
    return stacked.sum() if all_dims else stacked.sum(0)


def match_stacked_sum(run, args, kwargs):
    """``(stack node, args, info, inputs, depth)`` of a ``stacked_sum`` node when
    ``sum(*args, **kwargs)`` sums a pending ``torch.stack`` of ``run`` over all dims or dim
    0; else None, and the sum is recorded as it is."""
    if not args or type(args[0]) is not LazyTensor or args[0].index:
        return None
    if kwargs:
        if len(args) > 1 or len(kwargs) > 1 or "dim" not in kwargs:
            return None
        dim = kwargs["dim"]
    elif len(args) > 2:
        return None
    else:
        dim = args[1] if len(args) == 2 else None
    if dim is not None and not _is_zero(dim):
        return None
    stack = args[0].node
    if stack.fn is not _torch_stack or stack.batch is not None or stack.args is None \
            or stack.owner is not run:
        return None
    stack_args, stack_kwargs = stack.args, stack.kwargs
    if len(stack_args) > 2 or len(stack_args) == 2 and not _is_zero(stack_args[1]):
        return None
    if stack_kwargs and (len(stack_args) > 1 or len(stack_kwargs) > 1 or
                         not _is_zero(stack_kwargs.get("dim"))):
        return None
    xs = stack_args[0]
    if type(xs) is not list and type(xs) is not tuple or not xs:
        return None
    tkey = xs[0].tkey if type(xs[0]) is LazyTensor else None
    if tkey is None or tkey[1] not in _SUMMABLE or \
            any(type(x) is not LazyTensor or x.tkey != tkey for x in xs):
        return None
    mode = autograd_mode()
    if stack.info.grad != mode:     # gradients must flow exactly where eager's would
        return None
    all_dims = dim is None
    key = (stacked_sum, mode, tkey, all_dims)
    info = GLOBAL_SIGNATURES.get(key)
    if info is None:
        shape = _SCALAR if all_dims else tkey[0]
        info = GLOBAL_SIGNATURES[key] = Signature(
            OP, stacked_sum, outputs=((shape, tkey[1], tkey[2]),), grad=mode,
            name="stack(...).sum()" if all_dims else "stack(...).sum(0)")
        info.direct = (SEGMENT_SUM, all_dims)
    # xs is the stack's own copy (trace.snapshot), not the user's list: share it
    return stack, (xs, all_dims), info, stack.inputs, stack.depth - 1
