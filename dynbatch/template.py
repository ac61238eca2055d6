"""A call's template: its arguments with an ``Input(k, meta)`` marker where its k-th
per-example tensor goes, in the order ``signature.call_key`` numbers them. Made once per
signature; filled with the batched values of each batch (``filler``), or with fake
stand-ins for inference (infer.py).

A template holds what calls take: tuples, lists, dicts, slices, and leaves. One walker,
``map_leaves``, serves every use: written out rather than pytree's, because it also
enters slices (a bound may be a per-example tensor) and runs for every batch.
"""
from __future__ import annotations

import torch

from .lazy import Input, LazyTensor, TensorMeta, meta_of_tensor

Tensor = torch.Tensor
SCALARS = (int, float, bool, complex)
PLAIN = (str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format,
          type(Ellipsis), torch.Size)


class _Shared:
    """In a key, marks that the next part is a shared tensor: its identity in a call's key
    (signature.py), its meta in a key of inferred facts (``template_of``)."""

    def __repr__(self) -> str:
        return "shared"


SHARED = _Shared()


def map_leaves(f, a):
    """``a`` with ``f(leaf)`` in place of each leaf, containers and slices rebuilt."""
    t = type(a)
    if t is list or t is tuple:
        return t([map_leaves(f, x) for x in a])
    if t is dict:
        return {k: map_leaves(f, v) for k, v in a.items()}
    if t is slice:
        return slice(map_leaves(f, a.start), map_leaves(f, a.stop), map_leaves(f, a.step))
    return f(a)


def markers(a) -> list[Input]:
    """The ``Input`` markers in ``a``, in order."""
    found: list[Input] = []
    map_leaves(lambda x: found.append(x) if type(x) is Input else None, a)
    return found


def metas_of(targs, tkwargs) -> tuple:
    """The metas of a template's markers, in marker order."""
    return tuple(m.meta for m in sorted(markers((targs, tkwargs)), key=lambda m: m.k))


def _filled(a, values):
    return map_leaves(lambda x: values[x.k] if type(x) is Input else x, a)


def template_of(args, kwargs):
    """(args, kwargs) with an ``Input(k, meta)`` marker for the k-th per-example tensor, in
    the order ``call_key`` numbers them; the metas; and the key of what inference finds
    (shared tensors by meta), or None when an object other than a tensor is shared."""
    metas: list[TensorMeta] = []
    facts: list = []
    ok = [True]

    def sub(a):
        t = type(a)
        if t is LazyTensor:
            metas.append(a.meta)
            facts.append(a.meta)
            return Input(len(metas) - 1, a.meta)
        if t is list or t is tuple:
            facts.append(t)
            return t(sub(x) for x in a)
        if t is dict:
            facts.append((dict, tuple(a)))
            return {k: sub(v) for k, v in a.items()}
        if isinstance(a, Tensor):
            facts.append(SHARED)
            facts.append(meta_of_tensor(a))
            return a
        if t is slice:
            return slice(sub(a.start), sub(a.stop), sub(a.step))
        if t in SCALARS:
            facts.append(t)
            facts.append(a if a == a else "nan")
        elif t in PLAIN:
            facts.append(a)
        else:
            ok[0] = False
        return a

    targs = tuple(sub(a) for a in args)
    tkwargs = {}
    for name, value in kwargs.items():
        facts.append(name)
        tkwargs[name] = sub(value)
    return targs, tkwargs, tuple(metas), (tuple(facts) if ok[0] else None)


def _marker_paths(args, kwargs) -> tuple:
    """Where the markers of a template sit: the top-level arguments that hold any."""
    return tuple([("a", i) for i, a in enumerate(args) if markers(a)] +
                 [("k", name) for name, a in kwargs.items() if markers(a)])


def filler(args, kwargs):
    """A function putting a list of values (value k for marker k) into the template."""
    places = _marker_paths(args, kwargs)

    def fill(values):
        a, k = list(args), dict(kwargs)
        for kind, where_ in places:
            if kind == "a":
                a[where_] = _filled(a[where_], values)
            else:
                k[where_] = _filled(k[where_], values)
        return a, k
    return fill
