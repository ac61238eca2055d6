"""Signatures: the one place that decides which nodes may run as one batched call.

``signature_key`` builds, per recorded call, a hashable key from the callable, the
shape/dtype/device of every lazy input, the identity of every shared tensor, every Python
constant (with its type, so 1, 1.0 and True differ) and the autograd mode. Equal keys
mean one call can compute all those nodes. The key is mapped to a ``Signature``, which
holds what was inferred once for it: output shapes, the batching rule, and where the lazy
inputs sit in the arguments. This is the hot path of tracing.
"""
from __future__ import annotations

import torch

from .errors import MixedRunError
from .lazy import LazyTensor

Tensor = torch.Tensor
_is_grad_enabled = torch.is_grad_enabled
_is_inference = torch.is_inference_mode_enabled


def autograd_mode() -> int:
    """0: no grad, 1: grad, 2: inference mode. Part of every key: a node executes in the
    mode it was recorded in, whatever mode the read that runs it happens in."""
    return 2 if _is_inference() else 1 if _is_grad_enabled() else 0


class _Shared:
    """Marks a shared tensor's part of a key: (SHARED, id). Such keys live for one run, in
    which every shared tensor a node names stays alive (the node holds it), so its id is
    its identity. No shape is read: a tensor attribute read from a Tensor method while the
    run's mode is active costs a full torch-function dispatch (~7 us)."""

    def __repr__(self) -> str:
        return "shared"


SHARED = _Shared()
_SCALARS = (int, float, bool, complex)

OP, CONST, BLOCK, EAGER = "op", "const", "block", "eager"

# plain keys (no shared tensor, no user object; see is_cacheable) -> Signature, kept across
# runs; keys naming shared tensors or modules live in each run's local_signatures
GLOBAL_SIGNATURES: dict = {}


class Signature:
    """What every node with one key shares. Compared by identity: the key -> Signature map
    makes equal keys one object.

    kind: OP (a torch call), CONST (per-example data stacked at execution), BLOCK (one node
    for a whole module or function call), EAGER (cannot batch, or returns a Python value:
    runs at once per example on forced values).
    """

    __slots__ = ("kind", "fn", "rule", "outputs", "structure", "paths", "per_example",
                 "grad", "name", "direct", "indexed", "__weakref__")

    def __init__(self, kind, fn=None, rule=None, outputs=(), structure=None, paths=(),
                 per_example=(), grad=1, name=""):
        self.kind = kind
        self.fn = fn
        self.rule = rule
        self.outputs = outputs          # tkey of each output
        self.structure = structure      # None: one tensor; else a type to rebuild outputs
        self.paths = paths              # where lazy inputs sit: (i,), (i, j) or ("kw", name)
        self.per_example = per_example  # flags mirroring args, for the rule
        self.grad = grad                # autograd_mode() the nodes were recorded in
        self.name = name
        self.direct = None              # specialize.specialize's (fn, edits), when it applies
        self.indexed = False            # some plain node reads a later output (NOTE [indexed
                                        # plain nodes] in graph.py)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t[0])) for t in self.outputs)
        return f"<{self.kind} {self.name} -> {shapes}>"


class Uncacheable(Exception):
    pass


def _seq_key(seq, inputs, owner, depth_box):
    parts = [type(seq)]
    for a in seq:
        t = type(a)
        if t is LazyTensor:
            node = a.node
            if node.owner is not owner:
                raise_mixed(owner)
            inputs.append(node.id)
            if node.depth > depth_box[0]:
                depth_box[0] = node.depth
            parts.append(a.tkey)
        elif t in _SCALARS:
            parts.append(t)
            parts.append(a)
        elif isinstance(a, Tensor):
            parts.append((SHARED, id(a)))
        elif t is list or t is tuple:
            parts.append(_seq_key(a, inputs, owner, depth_box))
        elif t is slice:
            parts.append((slice, a.start, a.stop, a.step))
        else:
            parts.append(a)
    return tuple(parts)


def raise_mixed(owner):
    raise MixedRunError("a lazy tensor from another dynbatch run was used here; lazy tensors "
                        "belong to the @batched call or autobatch scope that made them "
                        "(use `.value` to carry a result from one run into another)")


def signature_key(fn, args, kwargs, owner):
    """(key, input node ids, max input depth, plain) of one call. ``owner`` is the
    recording run. ``plain``: the call's lazy inputs are exactly its first one or two
    arguments, each an output of a graph node, so ``inputs`` (with the output indices,
    NOTE [indexed plain nodes] in graph.py) say where the values come from (NOTE [plain
    nodes] in trace.py)."""
    mode = 2 if _is_inference() else 1 if _is_grad_enabled() else 0
    if not kwargs and 0 < len(args) <= 2:
        # Fast path for the commonest calls (unary ops; binary ops on two lazy tensors or a
        # lazy tensor and a Python number). It builds exactly the key the loop below would.
        a = args[0]
        if type(a) is LazyTensor:
            na = a.node
            if na.owner is owner:
                # inputs as tuples here: a node keeps them, and a tuple is 24 bytes
                # smaller than a list
                ia = na.id
                if len(args) == 1:
                    return (fn, mode, a.tkey), (ia,), na.depth, ia >= 0 and a.index < 16
                b = args[1]
                tb = type(b)
                if tb is LazyTensor:
                    nb = b.node
                    if nb.owner is owner:
                        ib = nb.id
                        depth = na.depth if na.depth > nb.depth else nb.depth
                        return (fn, mode, a.tkey, b.tkey), (ia, ib), depth, \
                            ia >= 0 and ib >= 0 and a.index < 16 and b.index < 16
                elif tb is float or tb is int:
                    return (fn, mode, a.tkey, tb, b), (ia,), na.depth, \
                        ia >= 0 and a.index < 16
    key = [fn, mode]
    inputs = []
    depth = -1
    for a in args:
        t = type(a)
        if t is LazyTensor:
            node = a.node
            if node.owner is not owner:
                raise_mixed(owner)
            inputs.append(node.id)
            if node.depth > depth:
                depth = node.depth
            key.append(a.tkey)
        elif t in _SCALARS:
            key.append(t)
            key.append(a)
        elif t is list or t is tuple:
            # flat: (type, length, items...) in the key itself, no nested tuple per call;
            # (h, c) pairs of a cell are the commonest argument of a block. The lazy case
            # repeats the one above inline: a helper call per item would cost more
            key.append(t)
            key.append(len(a))
            for x in a:
                tx = type(x)
                if tx is LazyTensor:
                    node = x.node
                    if node.owner is not owner:
                        raise_mixed(owner)
                    inputs.append(node.id)
                    if node.depth > depth:
                        depth = node.depth
                    key.append(x.tkey)
                elif tx in _SCALARS:
                    key.append(tx)
                    key.append(x)
                else:
                    box = [depth]
                    key.append(_seq_key((x,), inputs, owner, box))
                    depth = box[0]
        elif isinstance(a, Tensor):
            key.append((SHARED, id(a)))
        elif t is slice:
            key.append((slice, a.start, a.stop, a.step))
        else:
            key.append(a)
    if kwargs:
        # keywords are rare: one (name, value) pair each, through the general walker
        box = [depth]
        for name, a in kwargs.items():
            key.append(name)
            key.append(_seq_key((a,), inputs, owner, box))
        depth = box[0]
    return tuple(key), tuple(inputs), depth, False


def layout_of(args, kwargs):
    """(paths, per_example) of a call: where its lazy inputs sit, and the rule's flags."""
    paths = []
    flags = []
    for i, a in enumerate(args):
        t = type(a)
        if t is LazyTensor:
            paths.append((i,))
            flags.append(True)
        elif (t is list or t is tuple) and any(type(x) is LazyTensor for x in a):
            inner = []
            for j, x in enumerate(a):
                lazy = type(x) is LazyTensor
                if lazy:
                    paths.append((i, j))
                inner.append(lazy)
            flags.append(tuple(inner))
        else:
            flags.append(False)
    for name, a in kwargs.items():
        if type(a) is LazyTensor:
            paths.append(("kw", name))
    return tuple(paths), tuple(flags)


def is_cacheable(key) -> bool:
    """Keys made only of a torch callable and plain values (shapes, dtypes, constants) may
    be kept across runs. Keys naming a shared tensor or another object (a module, a user
    function) are kept for one run only: across runs they would grow the cache without
    bound (a fresh tensor per run, a fresh id) and keep a user's objects alive."""
    for part in key[1:]:
        if not _plain(part):
            return False
    return True


_PLAIN_TYPES = (int, float, bool, complex, str, type(None), torch.dtype, torch.device,
                torch.Size, type(Ellipsis), type, torch.layout, torch.memory_format)


def _plain(part) -> bool:
    if isinstance(part, _PLAIN_TYPES):
        return True
    if type(part) is tuple:
        return all(_plain(p) for p in part)
    return False
