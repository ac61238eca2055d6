"""What a new signature learns, once: the call's output shapes (inferred on stand-in
inputs), its batching rule and the rule's fixed decision (``specialize``), and whether it
is a stack/cat of many per-example members that the executor gathers in bulk.

Off the hot path: it runs once per signature key (per run for keys naming shared tensors
or modules), not once per recorded call. ``trace.record`` calls ``new_signature`` on a
cache miss.
"""
from __future__ import annotations

import torch

from . import rules, specialize, trace
from .errors import TraceError, raw_site, where
from .lazy import LazyTensor, map_lazy
from .signature import (EAGER, GLOBAL_SIGNATURES, OP, Signature, is_cacheable,
                        layout_of)

Tensor = torch.Tensor
_DisableTorchFunction = torch._C.DisableTorchFunction
_GLOBAL_LIMIT = 200_000     # plain keys kept across runs; cleared beyond this


def meta_of(lt: LazyTensor) -> Tensor:
    shape, dtype, _ = lt.tkey
    return torch.empty(shape, dtype=dtype, device="meta")


def _zeros_of(lt: LazyTensor) -> Tensor:
    shape, dtype, device = lt.tkey
    return torch.zeros(shape, dtype=dtype, device=device)


def _to_meta(args, kwargs):
    return map_lazy(args, kwargs, meta_of, shared=lambda t: t.detach().to("meta"))


def infer(fn, args, kwargs):
    """One call's output on stand-ins of its inputs (no grad): real zeros, which cost one
    small call per new signature, else meta tensors (zeros can hit a value-dependent error,
    e.g. a singular matrix). Not meta first: the first meta kernel imports torch._dynamo,
    about 2 s per process."""
    with _DisableTorchFunction(), torch.no_grad():
        zargs, zkwargs = map_lazy(args, kwargs, _zeros_of)
        try:
            return fn(*zargs, **zkwargs)
        except Exception as err:
            first = err
        try:
            margs, mkwargs = _to_meta(args, kwargs)
            return fn(*margs, **mkwargs)
        except Exception:
            raise first from None


_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__", "__setitem__"}


def new_signature(run, fn, args, kwargs, key) -> Signature:
    with _DisableTorchFunction():   # inference and specialization read tensor attributes
        return _make_signature(run, fn, args, kwargs, key)


def _make_signature(run, fn, args, kwargs, key) -> Signature:
    name = rules.name_of(fn)
    short = getattr(fn, "__name__", "")
    if (short.endswith("_") and not short.startswith("__")) or kwargs.get("inplace") is True \
            or kwargs.get("out") is not None or short in _INPLACE_DUNDERS:
        trace.unsupported(f"in-place {name} on a per-example tensor")
    if fn is _torch_stack or fn is _torch_cat:
        info = _list_signature(fn, args, kwargs, key[1], name)
        if info is not None:        # NOTE [list signatures stay in their run]
            run.local_signatures[key] = info
            return info
    try:
        out = infer(fn, args, kwargs)
    except Exception as err:
        raise TraceError(f"{name} failed for {where(run.example, raw_site(3))}\n"
                         f"  {type(err).__name__}: {err}") from err
    paths, flags = layout_of(args, kwargs)
    grad = key[1]
    if isinstance(out, Tensor):
        info = Signature(OP, fn, None, ((out.shape, out.dtype, _device_of(out, args)),),
                         None, paths, flags, grad, name=name)
    elif isinstance(out, (tuple, list)) and out and all(isinstance(o, Tensor) for o in out):
        structure = type(out)
        outputs = tuple((o.shape, o.dtype, _device_of(o, args)) for o in out)
        info = Signature(OP, fn, None, outputs, structure, paths, flags, grad, name=name)
    else:  # a Python value may depend on the data: compute it per example, on values
        info = Signature(EAGER, fn, name=name)
    if info.kind is OP:
        if any(p[0] == "kw" for p in paths):
            info.rule = lambda f, a, k, _pe, _paths=paths: rules.vmap_kwargs_rule(f, a, k,
                                                                                  _paths)
        else:
            info.rule = rules.rule_for(fn)
            info.direct = _bulk_list(fn, args, kwargs, paths) or \
                specialize.specialize(info.rule, fn, args, kwargs, flags)
    if is_cacheable(key):
        if len(GLOBAL_SIGNATURES) > _GLOBAL_LIMIT:
            GLOBAL_SIGNATURES.clear()
        GLOBAL_SIGNATURES[key] = info
    else:
        run.local_signatures[key] = info
    return info


BULK_STACK, BULK_CAT = "bulk-stack", "bulk-cat"


# NOTE [list signatures stay in their run]
# ``torch.stack(losses)`` over a tree's nodes has one signature per length of the list, and
# a minibatch of new trees brings dozens of new lengths. Kept across runs, each would be
# made while the run traces, in among its nodes in Python's 1 MiB arenas, and would keep
# those arenas resident after the run, through the backward pass (an arena goes back to the
# system only when every object in it is freed; NOTE [free lists at close] in api.py). So a
# stack or cat of four or more lazy tensors of one shape, the case the executor runs in
# bulk, gets its signature from the members' shape at once, without inferring or
# specializing (what they would find is this: the output shape, the bulk plan, the rule),
# and keeps it in its run only, made again in each run that meets its length (a few dozen
# lengths per SST minibatch; a test in tests/test_api.py checks it against inference). SST
# per-op B=64, first step after a one-example step, MB over the base (python
# benchmarks/memory_phases.py --batch 64): resident after the backward +14.9 -> +10.7; the
# step's peak, in Adam's update, +32.5 -> +28.5 (hand-batched: +22.4).
def _list_signature(fn, args, kwargs, grad, name) -> Signature | None:
    """The signature of a bulk stack or cat (``_bulk_list``) from its members' tkey; None
    for any other call, and for a dim out of range, which inference then reports."""
    paths, flags = layout_of(args, kwargs)
    bulk = _bulk_list(fn, args, kwargs, paths)
    if bulk is None:
        return None
    kind, d = bulk
    n = len(args[0])
    shape, dtype, device = args[0][0].tkey
    if kind is BULK_STACK:
        out = (*shape[:d], n, *shape[d:])
    else:
        out = (*shape[:d], shape[d] * n, *shape[d + 1:])
    info = Signature(OP, fn, rules.rule_for(fn), ((torch.Size(out), dtype, device),), None,
                     paths, flags, grad, name=name)
    info.direct = bulk
    return info


def _bulk_list(fn, args, kwargs, paths):
    """``torch.stack(losses)`` of many per-example tensors of one shape: the executor
    gathers all members in one go (k x B rows) and reshapes, instead of k gathers and an
    unsqueeze per member. Returns (BULK_STACK | BULK_CAT, per-example dim) or None."""
    if fn is not _torch_stack and fn is not _torch_cat:
        return None
    members = args[0] if args and type(args[0]) in (list, tuple) else None
    if members is None or len(members) < 4 or len(paths) != len(members):
        return None
    if any(type(m) is not LazyTensor or m.tkey != members[0].tkey for m in members):
        return None
    extra = set(kwargs) - {"dim"}
    if extra or len(args) > 2:
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    rank = len(members[0].tkey[0])
    kind, dims = (BULK_STACK, rank + 1) if fn is _torch_stack else (BULK_CAT, rank)
    if not isinstance(dim, int) or not -dims <= dim < dims:
        return None             # torch's error, which inference reports
    return kind, dim % dims


_torch_stack, _torch_cat = torch.stack, torch.cat


def _device_of(out: Tensor, args) -> torch.device:
    if out.device.type != "meta":
        return out.device
    for a in args:
        if type(a) is LazyTensor:
            return a.tkey[2]
        if type(a) in (list, tuple):
            for x in a:
                if type(x) is LazyTensor:
                    return x.tkey[2]
    return torch.device("cpu")
