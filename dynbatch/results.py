"""A run's results handed back to the user: every lazy tensor in a result replaced by its
value, through pytree (every container torch knows) and dataclasses; lists and dicts the
per-example code filled with lazy tensors updated in place.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from .graph import Constant
from .lazy import LazyTensor


def materialized(result, cache: dict):
    """``result`` with every lazy tensor replaced by its value. The rows of one batch output
    come from one ``unbind`` (one autograd node for all of them)."""
    def value(lt: LazyTensor):
        node = lt.node
        if isinstance(node, Constant):
            return node.as_tensor()
        run = node.owner
        src = run.store[run.graph.batch_of[node.id]][lt.index]
        rows = cache.get(id(src))
        if rows is None:
            rows = cache[id(src)] = (src, src.unbind(0))
        v = rows[1][run.graph.row_of[node.id]]
        return v if lt.meta.requires_grad else v.detach()
    with torch._C.DisableTorchFunction():
        if type(result) is LazyTensor:
            return value(result)
        if type(result) is tuple and all(type(x) is LazyTensor for x in result):
            return tuple([value(x) for x in result])
        return _tree_map_lazies(value, result)


def _tree_map_lazies(f, obj):
    """pytree's map over every container torch knows, and dataclasses (copied with their
    fields mapped), whose fields pytree leaves alone."""
    out = tree_map_only(LazyTensor, f, obj)
    leaves = tree_flatten(out)[0]
    if any(dataclasses.is_dataclass(x) and not isinstance(x, type) for x in leaves):
        return tree_map_only(lambda x: dataclasses.is_dataclass(x) and not isinstance(x, type),
                             lambda d: _dataclass_mapped(f, d), out)
    return out


def _dataclass_mapped(f, d):
    new = copy.copy(d)
    for fld in dataclasses.fields(d):
        object.__setattr__(new, fld.name, _tree_map_lazies(f, getattr(d, fld.name)))
    return new


def holds_lazy(containers) -> bool:
    """Whether lists and dicts among ``containers`` hold lazy tensors (what
    ``update_captures`` would fill in)."""
    return any(type(obj) in (list, dict) and _holds_lazy(obj) for obj in containers)


def update_captures(containers, cache: dict) -> None:
    """Lists and dicts among the call's arguments that the per-example code filled with
    lazy tensors (``log.append(h)``) get the values, in place."""
    for obj in containers:
        _update_in_place(obj, cache)


def _update_in_place(obj, cache) -> None:
    t = type(obj)
    if t is list:
        for i, x in enumerate(obj):
            if type(x) in (list, dict):
                _update_in_place(x, cache)
            elif _holds_lazy(x):
                obj[i] = materialized(x, cache)
    elif t is dict:
        for k, x in obj.items():
            if type(x) in (list, dict):
                _update_in_place(x, cache)
            elif _holds_lazy(x):
                obj[k] = materialized(x, cache)


def _holds_lazy(x) -> bool:
    return any(type(leaf) is LazyTensor for leaf in tree_flatten(x)[0])
