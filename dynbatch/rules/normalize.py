"""Argument normalization: every recorded call, whatever its spelling, as one canonical
callable and a dict of canonical argument names, before any rule reads it.

``x.norm(1, -1)``, ``torch.norm(x, p=1, dim=-1)`` and ``torch.norm(input=x, dim=-1, p=1)``
all become ``torch.norm`` with ``{"input": x, "p": 1, "dim": -1, "keepdim": False, ...}``:
positional forms, keywords, numpy aliases (``axis``, ``keepdims``) and defaults all end up
as names, bound by PyTorch's own schemas (``torch.fx.operator_schemas``) or, for Python
functions, their ``inspect`` signatures. Tensor methods are bound against their ``torch``
twin, or against the ATen schema when there is none; operators have fixed names. A call
that binds to no schema is not normalized, and no rule reads it (vmap runs it).

A normalization is worked out once per signature, as a recipe: for each canonical name,
where its value comes from in the call as written (``("a", i)``, ``("k", name)``) or the
default (``("v", value)``).
"""
from __future__ import annotations

import inspect
import types
import warnings
from dataclasses import dataclass
from typing import List

import torch
from torch.fx.operator_schemas import get_signature_for_torch_op, normalize_function

from ..lazy import Input

Tensor = torch.Tensor
_ALIASES = {"axis": "dim", "keepdims": "keepdim"}     # numpy names PyTorch's parser takes
# methods that take a shape or dims as varargs (``x.view(2, 3)``) as well as one sequence
_VARARGS = {"view", "reshape", "permute", "expand", "repeat", "flip", "tile", "new_zeros",
            "new_ones", "new_empty"}
# conversion methods: no schema of their own, one tensor argument and an optional memory format
_CONVERSIONS = {"float", "double", "half", "bfloat16", "long", "int", "short", "char", "byte",
                "bool", "cfloat", "cdouble", "cpu", "cuda"}
# torch's functions as imported, before any run replaces the hot ones by wrappers (trace.py)
_TORCH = {name: fn for name, fn in vars(torch).items() if callable(fn)}
_UNARY_OPERATORS = {"__invert__"}     # (Tensor.__neg__ is Tensor.neg: a method, not this)
# an operator whose function is named otherwise, and is not the method of that name
_OPERATOR_NAMES = {Tensor.__pow__: "__pow__"}


@dataclass(frozen=True, slots=True)
class Normal:
    """A call's canonical form: ``target(**kwargs)`` computes what the call computed, where
    ``kwargs`` follows ``recipe``. ``key`` is what the rule table is indexed by (the torch
    twin of a method, else the callable itself); ``view``: the output shares storage with
    an input (ATen's alias annotation)."""
    target: object
    recipe: tuple
    key: object
    view: bool


class Slot:
    """Stands for one argument of the call as written while its recipe is worked out."""
    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path


class PositionalCall:
    """A callable taking canonical names and calling ``fn`` with them positionally (the
    ones in ``names``) and by keyword (the rest): for methods and operators, whose own
    parameter names are not the schema's."""

    def __init__(self, fn, names: tuple):
        self.fn, self.names = fn, names
        self.__name__ = getattr(fn, "__name__", "call")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __call__(self, **kwargs):
        args = [kwargs.pop(n) for n in self.names]
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        return PositionalCall, (self.fn, self.names)

    def __repr__(self) -> str:
        return f"PositionalCall({self.__qualname__})"


def canonical(normal: Normal, args: tuple, kwargs: dict) -> dict:
    """The canonical kwargs of a call whose signature's recipe is ``normal.recipe``."""
    out = {}
    for name, (kind, where) in normal.recipe:
        out[name] = args[where] if kind == "a" else kwargs[where] if kind == "k" else \
            tuple(args[1:where]) if kind == "p" else where
    return out


def normalize(fn, args: tuple, kwargs: dict) -> Normal | None:
    """The canonical form of ``fn(*args, **kwargs)``, or None when no schema binds it. The
    arguments are a signature's template: per-example tensors are ``Input`` markers, which
    count as tensors where overloads differ by argument type."""
    name = _OPERATOR_NAMES.get(fn) or getattr(fn, "__name__", "")
    arg_types = tuple(type_hint(a) for a in args)
    kwarg_types = {k: type_hint(v) for k, v in kwargs.items()}
    if name in _UNARY_OPERATORS and len(args) == 1 and not kwargs:
        return Normal(PositionalCall(fn, ("input",)), (("input", ("a", 0)),), fn, False)
    if name in _CONVERSIONS and getattr(Tensor, name, None) is fn and len(args) == 1 and \
            set(kwargs) <= {"memory_format"}:
        recipe = (("input", ("a", 0)),) + tuple((k, ("k", k)) for k in kwargs)
        return Normal(PositionalCall(fn, ("input",)), recipe, fn, False)
    if name.startswith("__") and name.endswith("__"):
        if len(args) == 2 and not kwargs:     # binary operators, reflected ones included
            return Normal(PositionalCall(fn, ("input", "other")),
                          (("input", ("a", 0)), ("other", ("a", 1))), fn, _is_view(name))
        return None
    written = len(args)
    packed = _packs_varargs(fn, name, args)
    if packed:       # ``x.view(2, 3)`` bound as ``x.view((2, 3))``
        args = (args[0], tuple(args[1:]))
        arg_types = (arg_types[0], List[int])
    shape_view = name == "view" and len(args) == 2 and arg_types[1] == List[int]
    method = getattr(Tensor, name, None) is fn and name != ""
    for target, key, schema_fn, positional in _candidates(fn, name, shape_view):
        # a method binds its tensor to the schema's ``self``, which is not always the
        # first parameter (``x.where(c, y)`` is ``torch.where(c, x, y)``)
        at = _self_index(name) if method and args else 0
        bound = _recipe(schema_fn, args, kwargs, arg_types, kwarg_types, at)
        if bound is None:
            continue
        recipe, renamed = bound
        if packed:   # the packed tuple is args[1:] of the call as written
            recipe = tuple((n, ("p", written) if src == ("a", 1) else src)
                           for n, src in recipe)
        if positional is not None:
            target = positional(recipe)
            if target is None:
                continue
        elif isinstance(target, types.BuiltinFunctionType):
            target = _builtin_call(target, recipe)
        elif renamed:
            target = PositionalCall(target, tuple(n for n, _ in recipe))
        return Normal(target, recipe, key, _is_view(name))
    return None


_SELF_AT: dict = {}


def _builtin_call(fn, recipe):
    """A torch builtin called with the recipe's names: positionally up to its keyword-only
    parameters, as the overload that bound says (the Python binding of an overload may
    name a parameter otherwise than the schema: ``pow(Number self, Tensor exponent)``)."""
    names = tuple(n for n, _ in recipe)
    for sig in get_signature_for_torch_op(fn) or ():
        if tuple(sig.parameters) == names:
            return PositionalCall(fn, tuple(
                n for n, p in sig.parameters.items()
                if p.kind is not inspect.Parameter.KEYWORD_ONLY))
    return PositionalCall(fn, names)


def _self_index(name: str) -> int:
    """Where ATen's schemas of that name put ``self`` among their parameters (0 for all but
    a few, such as where's)."""
    at = _SELF_AT.get(name)
    if at is None:
        at = 0
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            for overload in packet.overloads():
                names = [a.name for a in getattr(packet, overload)._schema.arguments]
                if "self" in names:
                    at = max(at, names.index("self"))
        _SELF_AT[name] = at
    return at


def _packs_varargs(fn, name, args) -> bool:
    return name in _VARARGS and len(args) >= 2 and getattr(Tensor, name, None) is fn and \
        all(type(a) is int for a in args[1:])


def _candidates(fn, name, shape_view):
    """(target, rule key, callable to bind against, positional-names function or None):
    the ways to normalize ``fn``, best first."""
    method = getattr(Tensor, name, None) is fn and name != ""
    if method:
        twin = _TORCH.get(name)
        if twin is not None and callable(twin) and not isinstance(twin, type):
            yield twin, twin, twin, None
        if shape_view:          # view(*sizes): reshape's values, a view's aliasing
            yield torch.reshape, fn, torch.reshape, None
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            yield fn, fn, packet, lambda recipe: _overload(packet, recipe)
        if inspect.isfunction(fn):           # a Python method (Tensor.norm, Tensor.split)
            yield fn, fn, fn, None
        return
    if isinstance(fn, torch._ops.OpOverload):  # called by the schema's own names
        yield fn, fn, fn, lambda recipe: PositionalCall(
            fn, tuple(n for n, a in zip((n for n, _ in recipe), fn._schema.arguments)
                      if not a.kwarg_only))
        return
    yield fn, fn, fn, None


def _overload(packet, recipe):
    """The ATen overload whose parameters are the recipe's names, called as its schema says
    (a Tensor method's Python binding may differ from it in what is keyword-only)."""
    names = tuple(n for n, _ in recipe)
    for overload in packet.overloads():
        op = getattr(packet, overload)
        params = tuple("input" if a.name == "self" else a.name for a in op._schema.arguments)
        if params == names:
            return PositionalCall(op, tuple(n for n, a in zip(names, op._schema.arguments)
                                            if not a.kwarg_only))
    return None


def type_hint(value):
    """The type ``normalize_function`` matches overloads against."""
    if isinstance(value, (Tensor, Input)):
        return Tensor
    if type(value) in (list, tuple):
        if value and all(isinstance(v, (Tensor, Input)) for v in value):
            return List[Tensor]
        if all(type(v) is int for v in value):
            return List[int]
        if all(type(v) in (int, float) for v in value):
            return List[float]
    return type(value)


def _recipe(schema_fn, args, kwargs, arg_types, kwarg_types, self_at=0):
    """Bind the call against ``schema_fn``: (recipe, whether the first name was renamed to
    ``input``), or None when nothing binds. ``args[0]`` goes to position ``self_at``."""
    slots = [Slot(("a", i)) for i in range(len(args))]
    types = list(arg_types)
    if self_at:
        slots.insert(self_at, slots.pop(0))
        types.insert(self_at, types.pop(0))
    slots, types = tuple(slots), tuple(types)
    for renamed in ({k: k for k in kwargs}, _renamed(kwargs)):
        if renamed is None:
            continue
        kw_slots = {new: Slot(("k", old)) for old, new in renamed.items()}
        kw_types = {renamed[old]: t for old, t in kwarg_types.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bound = normalize_function(schema_fn, slots, kw_slots, types, kw_types,
                                           normalize_to_only_use_kwargs=True)
        except Exception:
            bound = None
        if bound is None:
            continue
        recipe = []
        renamed = False
        for n, value in bound.kwargs.items():
            if n in ("self", "tensor", "x") and not recipe:
                n, renamed = "input", True
            recipe.append((n, value.path if type(value) is Slot else ("v", value)))
        return tuple(recipe), renamed
    return None


def _renamed(kwargs: dict):
    """{name as written: canonical name} with the numpy aliases replaced, or None when the
    call uses none."""
    if not any(k in _ALIASES for k in kwargs):
        return None
    return {k: _ALIASES.get(k, k) for k in kwargs}


_VIEWS: dict = {}


def _is_view(name: str) -> bool:
    """Whether the ATen op of that name returns a view of an input in any overload."""
    hit = _VIEWS.get(name)
    if hit is None:
        hit = name in ("__getitem__", "detach", "view_as", "reshape_as", "expand_as")
        packet = getattr(torch.ops.aten, name.rstrip("_"), None) if name else None
        if packet is not None and not hit:
            for overload in packet.overloads():
                for r in getattr(packet, overload)._schema.returns:
                    info = r.alias_info
                    hit = hit or (info is not None and not info.is_write)
        _VIEWS[name] = hit
    return hit
