"""Fused patterns: a pattern of calls recorded as one node that batches better.

NOTE [stacked sums]: ``torch.stack(xs).sum()`` (a tree's node losses) and
``torch.stack(xs).sum(0)`` (a Child-Sum cell's children) are common in per-example code and
hard on batching: the stack's signature names ``len(xs)``, so every length makes its own
pair of batches. When ``sum`` is recorded on a pending stack of same-shaped tensors, the
sum is recorded instead as one ``stacked_sum(xs, all_dims)`` node whose signature leaves
the length out, and whose inputs are the stack's members. A batch of them is one gather of
every member of every node and one ``index_add`` by node. The stack node stays in the
graph: if nothing else reads it, it never runs (NOTE [dead code] in schedule.py). The sum
differs from eager's only in the order of its additions (rounding: for n float32 terms, at
most about n * 2**-24 times the sum of their magnitudes); its gradient is exact.
"""
from __future__ import annotations

import torch

from ..lazy import LazyTensor, meta_of
from ..state import state_now

_torch_stack = torch.stack
# float16 and bfloat16 sums accumulate in float32 in eager code, not in index_add
_SUMMABLE = (torch.float32, torch.float64)


def stacked_sum(xs, all_dims: bool):
    """What the fused node means, for one example."""
    stacked = torch.stack(xs)
    return stacked.sum() if all_dims else stacked.sum(0)


class SegmentSum:
    """How a batch of ``stacked_sum`` nodes is gathered and computed: its members' rows
    gathered as one column, node after node; its extra values: each row's node, and the
    count of nodes."""

    def __init__(self, all_dims: bool):
        self.all_dims = all_dims

    def members(self, nodes) -> tuple[list, list, list]:
        """The one column a batch gathers: every member of every node, node after node, as
        (ids, outs, each row's node)."""
        ids, outs, segments = [], [], []
        for row, node in enumerate(nodes):
            ids.extend(node.inputs)
            outs.extend(node.outs or (0,) * len(node.inputs))
            segments.extend([row] * len(node.inputs))
        return ids, outs, segments

    def batched(self, values):
        rows, segments, n = values
        out = rows.new_zeros((n,) + rows.shape[1:]).index_add(0, segments.to(rows.device), rows)
        if self.all_dims and out.dim() > 1:
            out = out.sum(tuple(range(1, out.dim())))
        return (out,)

    def per_example(self, values, row):
        rows, segments, _ = values
        return stacked_sum(list(rows[segments.to(rows.device) == row]), self.all_dims)


def match(tracer, args, kwargs):
    """(stack node, all_dims) when ``sum(*args, **kwargs)`` sums a pending
    ``torch.stack(xs)`` of same-shaped float32/float64 tensors over every dim or dim 0,
    recorded in the same state; else None, and the sum is recorded as it is."""
    if not args or type(args[0]) is not LazyTensor or args[0].index:
        return None
    if kwargs:
        if len(args) > 1 or set(kwargs) != {"dim"}:
            return None
        dim = kwargs["dim"]
    elif len(args) > 2:
        return None
    else:
        dim = args[1] if len(args) == 2 else None
    if dim is not None and not (type(dim) is int and dim == 0):
        return None
    stack = args[0].node
    if stack.id < 0 or stack.owner is not tracer or tracer.graph.computed(stack.id):
        return None
    sig = stack.sig
    if sig.state != state_now():
        return None
    if sig.fn is not _torch_stack or sig.normal is None or sig.fused is not None:
        return None
    canon = sig.template[1]
    if canon.get("dim") != 0 or len(sig.inputs) < 1 or len(set(sig.inputs)) != 1 or \
            len(stack.inputs) != len(canon["tensors"]):
        return None
    member = sig.inputs[0]
    if member.dtype not in _SUMMABLE:
        return None
    return stack, dim is None


def output_meta(member, all_dims: bool, grad: bool):
    shape = () if all_dims else member.shape
    return meta_of(shape, member.dtype, member.device, member.requires_grad and grad)
