"""Specialization: decide once per signature what a batching rule decides per batch.

A rule (rules.py) inspects ranks and dims on every batched call. For one signature those
are fixed, so ``specialize`` asks once: "is this batch just ``fn2(*args)`` with some
constant arguments changed?" It returns ``(fn2, edits)``: the callable and ((path, new
value), ...) to apply to a node's arguments before the batched tensors are put in place;
or None when the rule must run (it still handles every case). Edits never hold tensors,
so a specialization kept in the cross-run signature cache keeps no user tensor alive.
Every specialization is tested against the per-example loop (tests/test_rules.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .lazy import LazyTensor
from .rules import (_get_arg, _only_first_batched, _shift, cat_rule, elementwise_rule,
                    first_arg_rule, getitem_rule, matmul_rule, native_module_rule,
                    permute_rule, reduction_rule, split_rule, squeeze_rule, transpose_rule,
                    unbind_rule)

def _rank(a, batched: bool) -> int:
    if type(a) is LazyTensor:
        return len(a.tkey[0])
    return a.dim() - 1 if batched else a.dim()


def _same_call(fn, args, kwargs, per_example):
    return fn, ()


def _spec_elementwise(fn, args, kwargs, per_example):
    batched, other = [], 0
    for a, pe in zip(args, per_example):
        if pe is True:
            batched.append(_rank(a, True))
        elif type(pe) is tuple:
            return None
        elif isinstance(a, Tensor) or type(a) is LazyTensor:
            other = max(other, _rank(a, False))
    for v in kwargs.values():
        if isinstance(v, Tensor):
            other = max(other, v.dim())
    if batched and all(r == batched[0] for r in batched) and batched[0] >= other:
        return fn, ()
    return None


def _spec_first_arg(fn, args, kwargs, per_example):
    return (fn, ()) if _only_first_batched(per_example) else None


def _spec_native(module, args, kwargs, per_example):
    if isinstance(module, torch.nn.RNNCellBase):
        if per_example[0] is not True or _rank(args[0], True) != 1 or kwargs:
            return None
        if len(args) == 1:
            return module, ()
        flags = per_example[1]
        if flags is True or (type(flags) is tuple and all(flags)):
            return module, ()
        return None
    return (module, ()) if _only_first_batched(per_example) else None


def _edit(args, kwargs, pos, name, value, positional):
    return (((pos,), value),) if positional else ((("kw", name), value),)


def _spec_dim(pos, name):
    def spec(fn, args, kwargs, per_example):
        if not _only_first_batched(per_example):
            return None
        dim, positional = _get_arg(args, kwargs, pos, name)
        if dim is None or isinstance(dim, str):
            return None
        return fn, _edit(args, kwargs, pos, name, _shift(dim), positional)
    return spec


def _spec_split(pos, name, default):
    def spec(fn, args, kwargs, per_example):
        if not _only_first_batched(per_example):
            return None
        dim, positional = _get_arg(args, kwargs, pos, name, default)
        if not positional and name not in kwargs:
            return fn, ((("kw", name), _shift(dim)),)
        return fn, _edit(args, kwargs, pos, name, _shift(dim), positional)
    return spec


def _spec_reduction(fn, args, kwargs, per_example):
    if len(args) > 1 and not isinstance(args[1], (int, tuple, list)):
        return None
    return _spec_dim(1, "dim")(fn, args, kwargs, per_example)


def _spec_cat(fn, args, kwargs, per_example):
    flags = per_example[0]
    if type(flags) is not tuple or not all(flags) or any(per_example[1:]):
        return None
    dim, positional = _get_arg(args, kwargs, 1, "dim", 0)
    if not positional and "dim" not in kwargs:
        return fn, ((("kw", "dim"), _shift(dim)),)
    return fn, _edit(args, kwargs, 1, "dim", _shift(dim), positional)


def _spec_transpose(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example) or kwargs or len(args) != 3:
        return None
    return fn, (((1,), _shift(args[1])), ((2,), _shift(args[2])))


def _spec_permute(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example) or kwargs:
        return None
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return Tensor.permute, ((None, (0,) + tuple(_shift(tuple(dims)))),)


def _spec_getitem(fn, args, kwargs, per_example):
    if per_example[0] is not True or per_example[1]:
        return None
    index = args[1]
    items = index if type(index) is tuple else (index,)
    if any(isinstance(i, (Tensor, list, bool)) or type(i) is LazyTensor
           for i in items):
        return None
    return fn, (((1,), (slice(None),) + items),)


def _spec_matmul(fn, args, kwargs, per_example):
    if kwargs:
        return None
    a, b = args[0], args[1]
    pa, pb = per_example[0], per_example[1]
    if pa is True and pb is False and _rank(b, False) <= 2:
        return torch.matmul, ()
    if pa is True and pb is True and _rank(a, True) >= 2 and _rank(a, True) == _rank(b, True):
        return torch.matmul, ()
    return None


def _spec_squeeze(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example) or kwargs:
        return None
    if len(args) > 1:
        return fn, (((1,), _shift(args[1])),)
    shape = args[0].tkey[0] if type(args[0]) is LazyTensor else args[0].shape[1:]
    dims = tuple(i + 1 for i, s in enumerate(shape) if s == 1)
    return (Tensor.squeeze, ((None, dims),)) if dims else None


_SPECIALIZERS = {
    elementwise_rule: _spec_elementwise, first_arg_rule: _spec_first_arg,
    native_module_rule: _spec_native, reduction_rule: _spec_reduction,
    split_rule: _spec_split(2, "dim", 0), unbind_rule: _spec_split(1, "dim", 0),
    cat_rule: _spec_cat, transpose_rule: _spec_transpose, permute_rule: _spec_permute,
    getitem_rule: _spec_getitem, matmul_rule: _spec_matmul, squeeze_rule: _spec_squeeze,
}


def specialize(rule, fn, args, kwargs, per_example):
    """(fn2, edits) such that applying ``edits`` to the arguments and calling ``fn2`` gives
    what ``rule`` would; None when the rule must decide per batch. An edit whose path is
    None replaces all positional arguments after the first."""
    spec = _SPECIALIZERS.get(rule)
    if spec is None:
        dim_arg = getattr(rule, "dim_arg", None)
        if dim_arg is None:
            return None
        spec = _spec_dim(*dim_arg)
    try:
        return spec(fn, args, kwargs, per_example)
    except Exception:   # an odd call shape: leave it to the rule
        return None


def apply_edits(args: list, kwargs: dict, edits) -> dict:
    """Apply a specialization's edits in place to ``args`` (a list); returns the kwargs to
    use (a copy when an edit touches them)."""
    for path, value in edits:
        if path is None:
            del args[1:]
            args.append(value)
        elif path[0] == "kw":
            kwargs = dict(kwargs)
            kwargs[path[1]] = value
        else:
            args[path[0]] = value
    return kwargs
