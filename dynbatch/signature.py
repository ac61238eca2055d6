"""Signatures: the one place that decides which recorded calls may run as one batched call,
and what is worked out once for each.

``call_key`` builds a hashable key for each recorded call from the callable, the state
that changes results (grad mode, autocast, default dtype: ``state_now``), the meta of
every per-example tensor, the identity of every shared tensor and object, and every
Python constant with its type. Equal keys mean one call computes all those nodes. A new
key gets a ``Signature`` (``new_signature``): the call's template (its arguments, with an
``Input`` marker where each per-example tensor goes), its outputs inferred on fake
tensors (no side effects, no user code run on real data), its canonical form and the
batched call a rule makes of it, or vmap's.

Keys naming only plain values are kept across runs (``GLOBAL``). Keys naming shared
tensors or objects live for one run (a run's tensors and modules may be replaced between
runs); what they infer is kept across runs under the same key with each shared tensor's
meta in place of its identity (``_INFERRED``).
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import rules
from .errors import TraceError, warn_at, where
from .graph import outs_of
from .infer import checks_out, fake_cannot, infer
from .lazy import LazyTensor, TensorMeta, meta_of_tensor, with_length
from .rules import Call, fallback, fused, normalize, ragged
from .state import grad_mode_of
from .template import PLAIN, SCALARS, SHARED, filler, metas_of, template_of

Tensor = torch.Tensor
_einsum = torch.einsum      # as imported (a run replaces it by a wrapper while it records)
OP, READ, BLOCK, INPLACE = "op", "read", "block", "inplace"
_INPLACE_OPERATORS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                      "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                      "__ilshift__", "__irshift__", "__setitem__"}


# -- keys ---------------------------------------------------------------------------------

def call_key(fn, state, args, kwargs, tracer):
    """(key, input ids, output index of each input or None, local) of one call. ``local``:
    the key names a shared tensor or object, so it lives for this run only."""
    if not kwargs and 0 < len(args) <= 2 and type(args[0]) is LazyTensor:
        # the commonest calls, f(x), f(x, y) and f(x, 2.0), keyed as the loop below would
        a = args[0]
        na = a.node
        if na.owner is tracer:
            if len(args) == 1:
                return (fn, state, a.meta), (na.id,), outs_of((a.index,)) if a.index else None, \
                    False
            b = args[1]
            tb = type(b)
            if tb is LazyTensor and b.node.owner is tracer:
                outs = outs_of((a.index, b.index)) if a.index or b.index else None
                return (fn, state, a.meta, b.meta), (na.id, b.node.id), outs, False
            if (tb is float or tb is int) and b == b:
                outs = outs_of((a.index,)) if a.index else None
                return (fn, state, a.meta, tb, b), (na.id,), outs, False
    parts = [fn, state]
    inputs: list[int] = []
    outs: list[int] = []
    local = False
    for a in args:
        local |= _key_part(a, parts, inputs, outs, tracer)
    for name, value in kwargs.items():
        parts.append(name)
        local |= _key_part(value, parts, inputs, outs, tracer)
    return tuple(parts), tuple(inputs), outs_of(tuple(outs)), local


def _key_part(a, parts: list, inputs: list, outs: list, tracer) -> bool:
    """Append one argument's part of a key (any argument, nested in any container);
    whether it names a shared tensor or object."""
    t = type(a)
    if t is LazyTensor:
        node = a.node
        if node.owner is not tracer:
            tracer.foreign(a)
        inputs.append(node.id)
        outs.append(a.index)
        parts.append(a.meta)
        return False
    if t in SCALARS:
        parts.append(t)
        parts.append(a if a == a else "nan")
        return False
    if t is list or t is tuple or t is dict:
        parts.append(t)
        parts.append(len(a) if t is not dict else tuple(a))
        local = False
        for x in (a.values() if t is dict else a):
            local |= _key_part(x, parts, inputs, outs, tracer)
        return local
    if t is slice:
        parts.append(slice)
        return _key_part((a.start, a.stop, a.step), parts, inputs, outs, tracer)
    if t in PLAIN:
        parts.append(a)
        return False
    if t in _OBJECTS:               # a module (a method's self), a config object
        parts.append(a)
        return True
    if isinstance(a, Tensor):       # shared: by identity, for this run
        parts.append(SHARED)
        parts.append(id(a))
        return True
    try:                            # modules, functions, user objects: by identity
        hash(a)
        parts.append(a)
        if len(_OBJECTS) < 1000 and t.__hash__ is object.__hash__:
            _OBJECTS.add(t)
    except TypeError:
        parts.append((t, id(a)))
    return True


_OBJECTS: set = set()       # types met as hashable, identity-hashed objects in keys


# -- signatures ---------------------------------------------------------------------------

class Signature:
    """What every node of one key shares. Compared by identity (the key -> signature maps
    make equal keys one object).

    ``inputs``: the meta of each per-example input (``Input`` k of ``template``);
    ``outputs``: of each output, in pytree order; ``wrap(node)`` gives a node's lazy
    outputs in the call's structure; ``batched(values)`` computes a whole batch from the
    batched value of each input, as the tuple of its outputs; ``how`` says by what
    ("rule", "vmap", "loop", "block");
    ``per_example(values)`` is the call for one example. ``normal``: the canonical form,
    ``rule``: the rule's batched call of it (both None where none applies). ``site``:
    where it was first recorded (for warnings). ``ragged``: its form over sequences of
    any length, ``family``: the signatures of other lengths it runs jointly with (NOTE
    [ragged groups] in rules/ragged.py; None where it has none)."""

    __slots__ = ("kind", "fn", "name", "state", "inputs", "outputs", "wrap", "target",
                 "template", "fill", "batched", "how", "site", "view", "fused",
                 "normal", "rule", "flat", "single", "source", "ragged", "family",
                 "__weakref__")

    def __init__(self, kind, fn, name, state, inputs=(), outputs=(), wrap=None):
        self.kind, self.fn, self.name, self.state = kind, fn, name, state
        self.inputs, self.outputs, self.wrap = inputs, outputs, wrap
        self.single = None      # the output's meta, when the call returns one tensor
        self.target = fn
        self.template = ((), {})
        self.fill = None
        self.batched = None
        self.how = ""
        self.site = None
        self.view = False
        self.fused = None       # rules/fused.py: how the plan gathers this signature's inputs
        self.normal = None
        self.rule = None
        self.flat = _as_tuple     # a call's output structure -> the tuple of its tensors
        self.source = None        # what rebuilds it in another process (refs.py)
        self.ragged = None        # rules/ragged.py: how it runs jointly across lengths
        self.family = None        # the token of the signatures it may run jointly with

    def per_example(self, values):
        args, kwargs = self.fill(values)
        return self.target(*args, **kwargs)

    @property
    def differentiable(self) -> bool:
        """Whether its outputs may carry gradients."""
        return any(m.requires_grad for m in self.outputs)

    @property
    def cuts_grad(self) -> bool:
        """Whether it reads a value that requires grad and makes none that does (argmax,
        a comparison): the values it reads may then be needed without their gradients."""
        return any(m.requires_grad for m in self.inputs) and not self.differentiable

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(m.shape)) for m in self.outputs)
        return f"<{self.kind} {self.name} -> {shapes}>"


def name_of(fn) -> str:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    name = name.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "")
    if mod == "torch.nn.functional":
        return "F." + name
    if mod.startswith("torch") and "." not in name:
        return "torch." + name
    return name


def _as_tuple(out) -> tuple:
    return (out,) if isinstance(out, Tensor) else tuple(tree_flatten(out)[0])


def wrapper(out_spec, metas):
    """A function making a node's lazy outputs in the structure the call returns."""
    if out_spec is None:
        m0 = metas[0]
        return lambda node: LazyTensor(node, 0, m0)
    if out_spec.type is tuple and all(c.is_leaf() for c in out_spec.children()):
        if len(metas) == 2:
            m0, m1 = metas
            return lambda node: (LazyTensor(node, 0, m0), LazyTensor(node, 1, m1))
        return lambda node: tuple([LazyTensor(node, i, m) for i, m in enumerate(metas)])
    return lambda node: tree_unflatten([LazyTensor(node, i, m) for i, m in enumerate(metas)],
                                       out_spec)


GLOBAL: dict = {}           # key -> Signature, for keys naming plain values only
_INFERRED: dict = {}        # facts key -> a signature whose inferred parts a run reuses
_LIMIT = 100_000


def signature_for(fn, args, kwargs, key, local, state, tracer, site) -> Signature:
    """The signature of a key met for the first time (in this run, for a local key)."""
    targs, tkwargs, metas, facts = template_of(args, kwargs)
    facts_key = (fn, state) + facts if local and facts is not None else None
    known = _INFERRED.get(facts_key) if facts_key is not None else None
    if known is not None:
        sig = _rebound(known, targs, tkwargs)
    else:
        free = _length_free(fn, state, facts, metas)
        other = _OTHER_LENGTH.get(free) if free is not None else None
        sig = _at_length(other, targs, tkwargs, metas, site) if other is not None else None
        if sig is None:
            sig = _new_signature(fn, targs, tkwargs, metas, state, tracer, site)
            if free is not None and sig.ragged is not None and sig.single is not None \
                    and sig.normal is not None:
                if len(_OTHER_LENGTH) > _LIMIT:
                    _OTHER_LENGTH.clear()
                _OTHER_LENGTH[free] = sig
        if facts_key is not None:
            if len(_INFERRED) > _LIMIT:
                _INFERRED.clear()
            _INFERRED[facts_key] = sig
    if sig.ragged is not None:
        sig.family = ragged.family_of(key, sig)
    if not local:
        if len(GLOBAL) > _LIMIT:
            GLOBAL.clear()
        sig = GLOBAL.setdefault(key, sig)     # two threads may have made it at once
    return sig


_OTHER_LENGTH: dict = {}    # length-free facts -> a signature with a ragged form


def _length_free(fn, state, facts, metas):
    """The facts of a call with the length L of its first input's sequence left out of
    every per-example meta that has it (dim 0), or None: lengths 0 and 1 are inferred
    afresh (a size-1 dim broadcasts)."""
    if facts is None or not metas or not metas[0].shape or metas[0].shape[0] < 2:
        return None
    length = metas[0].shape[0]
    parts, shared = [fn, state], False
    for part in facts:
        if type(part) is TensorMeta and not shared and part.shape and \
                part.shape[0] == length:
            part = with_length(part, -1)
        shared = part is SHARED
        parts.append(part)
    return tuple(parts)


def _at_length(other: Signature, targs, tkwargs, metas, site) -> Signature | None:
    """NOTE [ragged groups] in rules/ragged.py: the signature of a call that differs from
    ``other`` only in its sequences' length, without inference: an op with a ragged form
    computes every length alike, its output along the sequence when the form's is (else
    of the same shape), and its rule takes any length. None when the form does not hold
    at this length."""
    length = metas[0].shape[0]
    outputs = other.outputs
    if other.ragged.along:
        outputs = tuple(with_length(m, length) for m in outputs)
    sig = Signature(OP, other.fn, other.name, other.state, metas, outputs,
                    wrapper(None, outputs))
    sig.single, sig.site, sig.view = outputs[0], site, other.view
    normal = sig.normal = other.normal
    canon = normalize.canonical(normal, targs, tkwargs)
    sig.ragged = ragged.form_of(normal.key, canon, metas, outputs)
    if sig.ragged is None or sig.ragged.kind != other.ragged.kind:
        return None
    rule = rules.rule_for(normal.key) if other.rule is not None else None
    sig.rule = rule(Call(other.fn, normal.target, canon, outputs)) if rule else None
    _finish(sig, targs, tkwargs)
    return sig


def _rebound(known: Signature, targs, tkwargs) -> Signature:
    """``known``, inferred for other shared tensors of the same metas, with this call's
    shared tensors in its template."""
    sig = Signature(known.kind, known.fn, known.name, known.state, known.inputs,
                    known.outputs, known.wrap)
    for slot in ("view", "fused", "site", "normal", "rule", "single", "ragged"):
        setattr(sig, slot, getattr(known, slot))
    if known.kind is OP:
        _finish(sig, targs, tkwargs)
    return sig


def rebuilt_op(fn, targs, tkwargs, state) -> Signature:
    """An OP signature made again from its source (refs.py: in another process)."""
    return _new_signature(fn, targs, tkwargs, metas_of(targs, tkwargs), state, None, None)


def _new_signature(fn, targs, tkwargs, metas, state, tracer, site) -> Signature:
    name = name_of(fn)
    short = getattr(fn, "__name__", "")
    if (short.endswith("_") and not short.startswith("__")) or short in _INPLACE_OPERATORS:
        return Signature(INPLACE, fn, name, state, metas)
    try:
        out = infer(fn, targs, tkwargs, state)
    except Exception as err:
        if fake_cannot(err):       # data-dependent output, or no fake kernel: per example
            return Signature(READ, fn, name, state, metas)
        example = tracer.example if tracer is not None else None
        raise TraceError(f"{name} failed for {where(example, site)}\n"
                         f"  {type(err).__name__}: {err}") from err
    leaves, spec = tree_flatten(out)
    if not leaves or not all(isinstance(x, Tensor) for x in leaves):
        return Signature(READ, fn, name, state, metas)      # a Python value: per example
    outputs = tuple(meta_of_tensor(x) for x in leaves)
    sig = Signature(OP, fn, name, state, metas, outputs,
                    wrapper(None if spec.is_leaf() else spec, outputs))
    sig.single = outputs[0] if spec.is_leaf() else None
    sig.site = site
    normal = sig.normal = normalize.normalize(fn, targs, tkwargs)
    if normal is not None:
        canon = normalize.canonical(normal, targs, tkwargs)
        if canon.get("inplace") is True or canon.get("out") is not None:
            return Signature(INPLACE, fn, name, state, metas)
        sig.view = normal.view
        rule = rules.rule_for(normal.key)
        if rule is not None:
            sig.rule = rule(Call(fn, normal.target, canon, outputs))
            if sig.rule is not None and not checks_out(sig.rule, canon, outputs, state):
                sig.rule = None
        sig.ragged = ragged.form_of(normal.key, canon, metas, outputs)
    elif fn is _einsum and not tkwargs:
        sig.ragged = ragged.einsum_form(targs, outputs)
    _finish(sig, targs, tkwargs)
    return sig


def stacked_sum_signature(state, member: TensorMeta, all_dims: bool) -> Signature:
    """The signature of a ``stacked_sum`` node (NOTE [stacked sums] in rules/fused.py): its
    key leaves the number of members out."""
    key = (fused.stacked_sum, state, member, all_dims)
    sig = GLOBAL.get(key)
    if sig is None:
        out = fused.output_meta(member, all_dims, grad_mode_of(state) == 1)
        sig = Signature(OP, fused.stacked_sum, "stack(...).sum()" if all_dims else
                        "stack(...).sum(0)", state, (member,), (out,),
                        wrapper(None, (out,)))
        sig.single = out
        sig.source = ("stacked-sum", member, all_dims)
        sig.fused = fused.SegmentSum(all_dims)
        sig.batched = sig.fused.batched
        sig.how = "rule"
        sig = GLOBAL.setdefault(key, sig)
    return sig


def _finish(sig: Signature, targs, tkwargs) -> None:
    """An OP signature's template, filler and batched call, from its normal form and rule."""
    sig.source = ("op", sig.fn, targs, tkwargs)
    if sig.normal is not None:
        sig.target = sig.normal.target
        sig.template = ((), normalize.canonical(sig.normal, targs, tkwargs))
    else:
        sig.target, sig.template = sig.fn, (targs, tkwargs)
    fill = sig.fill = filler(*sig.template)
    target, rule, flat = sig.target, sig.rule, sig.flat
    why = fallback.alone(sig.normal.key, sig.template[1]) if sig.normal is not None else None
    if why is not None:
        alone(sig, why)
    elif rule is not None:
        sig.how = "rule"
        sig.batched = lambda values: flat(rule(fill(values)[1]))
    else:
        sig.how = "vmap"
        sig.batched = lambda values: flat(fallback.vmap_call(target, fill, values))




def alone(sig: Signature, why: str) -> None:
    """``sig`` runs one example at a time (``fallback.alone``), said once per name."""
    sig.how, sig.rule, sig.ragged = "loop", None, None
    target, fill, flat = sig.target, sig.fill, sig.flat
    sig.batched = lambda values: flat(fallback.loop_call(target, fill, values,
                                                         values[0].shape[0]))
    if sig.name not in _ALONE:
        _ALONE.add(sig.name)
        warn_at(f"dynbatch runs {sig.name} one example at a time: {why}", sig.site)


_ALONE: set = set()
