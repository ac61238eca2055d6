"""Indexing rules: ``x[index]`` with shared or per-example indices, ATen's advanced
indexing, and item assignment recorded out of place (``setitem``, trace.py), with the
batch dim in front of every per-example index (NOTE [batch dim] in ``__init__.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..lazy import Input
from .registry import Call, register

_T = Tensor
# torch's function as imported (a run replaces the hot ones by wrappers while it records)
_arange = torch.arange


def _advanced(item) -> bool:
    return isinstance(item, (Tensor, Input, list)) or type(item) is bool


def getitem(call: Call):
    """``x[index]``. A per-example x and a shared index of basic items and at most one
    advanced one: a full slice in front. A shared table and a per-example index tensor as
    the whole index: the table indexed by the batch of indices. Both per-example: each
    row paired with its own indices."""
    x, index = call.kwargs["input"], call.kwargs["other"]
    items = index if type(index) is tuple else (index,)
    lazy_index = any(type(i) is Input for i in items)
    if type(x) is Input and not lazy_index:
        advanced = [i for i in items if _advanced(i)]
        if advanced and (len(advanced) > 1 or any(type(i) is int for i in items)):
            return None
        full = (slice(None),) + items
        return lambda kw: kw["input"][full]
    if type(index) is not Input or index.meta.dtype not in (torch.int64, torch.int32):
        return None
    if type(x) is not Input:
        return lambda kw: kw["input"][kw["other"]]
    extra = len(index.meta.shape)

    def run(kw):
        x, idx = kw["input"], kw["other"]
        rows = _arange(x.shape[0], device=x.device).view(-1, *([1] * extra))
        return x[rows, idx]
    return run


register(getitem, _T.__getitem__)


def index(call: Call):
    """ATen's advanced indexing (trace.py records ``table[i]`` with a 0-d index as it): a
    shared table and per-example index tensors at the first dims gives the table indexed by
    the batched indices."""
    x, indices = call.kwargs["input"], call.kwargs["indices"]
    if type(x) is Input or not indices or not all(type(i) is Input for i in indices):
        return None
    if len({len(i.meta.shape) for i in indices}) != 1 or len(indices[0].meta.shape) != 0:
        return None
    return lambda kw: kw["input"][tuple(kw["indices"])]


register(index, torch.ops.aten.index.Tensor)




def setitem(input, index, value):
    """``x[index] = value`` as a value: what ``x`` holds after the assignment."""
    out = input.clone()
    out[index] = value
    return out


def setitem_rule(call: Call):
    """A per-example tensor, a shared basic index (at most one advanced item) and a value
    that is shared or per-example: a full slice in front of the index, the per-example
    value aligned to the batch dim."""
    x, index, value = call.kwargs["input"], call.kwargs["index"], call.kwargs["value"]
    items = index if type(index) is tuple else (index,)
    if type(x) is not Input or any(type(i) is Input for i in items):
        return None
    advanced = [i for i in items if _advanced(i)]
    if advanced and (len(advanced) > 1 or any(type(i) is int for i in items)):
        return None
    full = (slice(None),) + items
    if type(value) is not Input:
        def run_shared(kw):
            out = kw["input"].clone()
            out[full] = kw["value"]
            return out
        return run_shared
    def run(kw):
        out = kw["input"].clone()
        v = kw["value"]
        target_rank = out[full].dim() - 1
        extra = target_rank - (v.dim() - 1)
        if extra > 0:
            v = v.reshape(v.shape[0], *([1] * extra), *v.shape[1:])
        out[full] = v
        return out
    return run


register(setitem_rule, setitem)
