"""Recording: torch calls on per-example data become nodes of the recording run's graph.

Which tensors are per-example: lazy tensors, and every tensor made inside the traced code
from no lazy input (``torch.zeros(h)``, ``W.t()``), which becomes a constant; a Python
scalar made a tensor (``torch.tensor(word_id)``) is a constant that keeps the scalar.
Every other tensor reached (parameters, buffers, tables) is shared and passed to batched
calls as it is.

``Tracer.record(fn, args, kwargs)`` is the hot path: one key, one dict lookup, one node.
What a new key needs is worked out once, in signature.py. How calls reach the tracer is
intercept.py's business.
"""
from __future__ import annotations

from array import array
from sys import _getframe

import torch
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_map_only

from .codegen import site_recorder
from .errors import MixedRunError, TraceError, UnsupportedError, internal_files, user_site, where
from .graph import Constant, Graph, Node
from .intercept import holds_lazy
from .lazy import LazyTensor, meta_of, meta_of_tensor
from .rules import fused
from .rules.indexing import setitem
from .signature import GLOBAL, INPLACE, OP, READ, call_key, signature_for, stacked_sum_signature
from .state import state_now

Tensor = torch.Tensor
_DisableTorchFunction = torch._C.DisableTorchFunction
_torch_tensor = torch.tensor

_PY_SCALAR_DTYPE = {int: torch.int64, bool: torch.bool, float: None}


class Tracer:
    """Records the calls of one run into a Graph. ``session.Run`` adds the lifecycle, the
    reads (``read``, ``value_of``) and execution; ``blocks.BodyTracer`` records a block's
    body once."""

    fuses = True        # record fused patterns (rules/fused.py); a block body's nodes may not
    hooked = False      # module hooks registered for every module (blocks.global_hooks)

    def __init__(self) -> None:
        self.graph = Graph()
        self.signatures: dict = {}      # keys naming shared tensors or objects: this run only
        self.example: int | None = None
        self.closed = False
        self.immediates: dict = {}      # (value, type, dtype, device) -> Constant
        self.viewed: set = set()        # ids of nodes and constants that a view op read
        self.sites: dict = {}           # id(code) -> {offset: recorder} (NOTE [call sites])
        self.modules: dict = {}         # id(module) -> what its signatures read of it
        self.default_device = torch.get_default_device()

    # -- the hot path ---------------------------------------------------------------------
    def record(self, fn, args, kwargs):
        """Record ``fn(*args, **kwargs)``; returns its lazy output(s)."""
        frame = None
        if fn is _GETITEM:
            fn, args = _tensor_index(args)
        elif (fn is _SUM or fn is _TORCH_SUM) and self.fuses:
            stacked = fused.match(self, args, kwargs)
            if stacked is not None:
                return self._stacked_sum(*stacked)
        else:
            # NOTE [call sites]: the caller of a Tensor method, or one frame further for
            # a hot wrapper or the mode
            frame = _getframe(2)
            if _internal_files.get(frame.f_code.co_filename) is not False:
                frame = frame.f_back
            out = self.replayed(frame, fn, args, kwargs)
            if out is not None:
                return out
        state = state_now()
        key, inputs, outs, local = call_key(fn, state, args, kwargs, self)
        sig = (self.signatures if local else GLOBAL).get(key)
        if sig is None:
            with _DisableTorchFunction():   # inference: dynbatch's calls, not the user's
                sig = signature_for(fn, args, kwargs, key, local, state, self, user_site(2))
            if local:
                self.signatures[key] = sig
        if sig.kind is not OP:
            return self.special(sig, fn, args, kwargs)
        # the user's line: the caller of a Tensor method, or one frame further for a hot
        # wrapper or the mode, or more through torch's own Python (user_site walks on)
        site = user_site(2)
        out = self.append(sig, inputs, outs, site)
        if frame is not None:
            self.remember(frame, fn, args, kwargs, sig, site)
        return out

    def replayed(self, frame, fn, args, kwargs):
        """NOTE [call sites]: the call recorded by the recorder of ``frame``'s line, or None
        when it has none or the call is not like the one it was made for."""
        lines = self.sites.get(id(frame.f_code))
        if lines is not None:
            recorder = lines.get(frame.f_lasti)
            if recorder is not None and type(recorder) is not list:
                return recorder(fn, args, kwargs, self)
        return None

    def remember(self, frame, fn, args, kwargs, sig, site) -> None:
        """NOTE [call sites]: a line of user code mostly makes the same call each time it
        runs (the same function and objects, per-example tensors of the same metas). Each
        line (its code object and offset) keeps for this run a recorder compiled for its
        last call's layout (codegen.site_recorder): straight-line checks that a call is
        like that one, then its node, without building and hashing a key or looking up
        the line's site. Any other call takes the general way and leaves its own recorder.
        Kept only where the frame is the user's own line: a line of torch's Python (a
        module's forward calling its submodules) serves many user lines."""
        if site is None or site[0] is not frame.f_code:
            return
        lines = self.sites.get(id(frame.f_code))
        if lines is None:
            lines = self.sites[id(frame.f_code)] = {}
        seen = lines.get(frame.f_lasti)
        if seen is None:                    # the first call here: [its signature, changes]
            lines[frame.f_lasti] = [sig, 0]
        elif type(seen) is not list:        # its recorder declined: the call changed
            lines[frame.f_lasti] = [sig, seen.changes + 1]
        elif seen[0] is not sig:
            seen[0], seen[1] = sig, seen[1] + 1
        elif seen[1] < _SITE_CHANGES:       # the same call twice in a row
            recorder = site_recorder(fn, args, sig, site, kwargs)
            if recorder is None:
                seen[1] = _SITE_CHANGES
            else:
                recorder.changes = seen[1]
                lines[frame.f_lasti] = recorder

    def _stacked_sum(self, stack: Node, all_dims: bool):
        """NOTE [stacked sums] in rules/fused.py."""
        sig = stacked_sum_signature(stack.sig.state, stack.sig.inputs[0], all_dims)
        return self.append(sig, stack.inputs, stack.outs, user_site(2))

    def append(self, sig, inputs: tuple, outs, site):
        """The one place nodes are made: a node of ``sig`` reading ``inputs`` (at outputs
        ``outs``), recorded at ``site``; returns its lazy output(s)."""
        nodes = self.graph.nodes
        node = Node(len(nodes), sig, inputs, outs, site, self)
        nodes.append(node)
        if sig.view:
            self.viewed.update(inputs)
        out = sig.single
        return LazyTensor(node, 0, out) if out is not None else sig.wrap(node)

    def special(self, sig, fn, args, kwargs):
        if sig.kind is READ:
            return self.read(fn, args, kwargs)
        if sig.kind is INPLACE:
            return self.inplace(sig, fn, args, kwargs)
        raise AssertionError(f"unexpected signature {sig!r}")

    # -- per-example data -----------------------------------------------------------------
    def constant(self, value: Tensor) -> LazyTensor:
        """A tensor made inside the traced code: per-example data of this example."""
        graph = self.graph
        meta = meta_of_tensor(value)
        c = Constant(~len(graph.constants), value, meta, self)
        graph.constants.append(c)
        return LazyTensor(c, 0, meta)

    def immediate(self, value, dtype, device) -> LazyTensor:
        """``torch.tensor(value)`` of a Python scalar. One constant per distinct value (word
        ids and labels repeat); a fresh lazy tensor per call, so that an in-place op on one
        (recorded functionally, rebinding that lazy tensor) leaves the others alone."""
        key = (value, type(value), dtype, device)
        c = self.immediates.get(key)
        if c is None:
            graph = self.graph
            meta = meta_of((), dtype, device)
            c = self.immediates[key] = Constant(~len(graph.constants), value, meta, self)
            graph.constants.append(c)
        return LazyTensor(c, 0, c.meta)

    def tensor(self, args, kwargs):
        """``torch.tensor(...)`` in traced code."""
        if not kwargs and len(args) == 1 and type(args[0]) is int:     # a word id, a label
            value = args[0]
            c = self.immediates.get(value)
            if c is None:
                c = self.immediates[value] = self.immediate(value, torch.int64,
                                                            self.default_device).node
            return LazyTensor(c, 0, c.meta)
        if len(args) == 1 and type(args[0]) in _PY_SCALAR_DTYPE and \
                set(kwargs) <= {"dtype", "device"}:
            value = args[0]
            dtype = kwargs.get("dtype") or _PY_SCALAR_DTYPE[type(value)] or \
                torch.get_default_dtype()
            device = kwargs.get("device")
            device = torch.device(device) if device is not None else self.default_device
            return self.immediate(value, dtype, device)
        if not kwargs and len(args) == 1 and type(args[0]) is list and args[0] and \
                self.default_device.type == "cpu" and \
                all(type(v) is int for v in args[0]):      # a sentence's word ids
            try:    # one C loop, as torch.tensor makes it but ~10x sooner
                return self.constant(torch.frombuffer(array("q", args[0]), dtype=torch.int64))
            except OverflowError:
                pass
        if holds_lazy(args, kwargs):
            return self.read(_torch_tensor, args, kwargs)
        return self.eager(_torch_tensor, args, kwargs)

    def eager(self, fn, args, kwargs):
        """A torch call on no per-example input: run it now; tensors it makes are
        per-example constants."""
        if self.default_device.type != "cpu" and "device" not in kwargs and \
                fn in _device_constructors():
            # torch.set_default_device's mode sits below ours and is disabled with it
            kwargs = dict(kwargs, device=self.default_device)
        with _DisableTorchFunction():
            out = fn(*args, **kwargs)
        if type(out) is Tensor:     # the commonest: torch.tensor(word_ids)
            return out if any(out is a for a in args) else self.constant(out)
        return tree_map_only(Tensor, lambda t: t if any(t is a for a in args)
                             else self.constant(t), out)

    # -- in-place calls -------------------------------------------------------------------
    def inplace(self, sig, fn, args, kwargs):
        """An in-place call on a lazy tensor, recorded out of place; the lazy tensor object
        then stands for the result, as the mutated tensor would. Refused (loudly) where the
        eager mutation would also change another tensor: the lazy tensor is a view, or a
        view of it was taken."""
        x = args[0] if args else None
        if type(x) is not LazyTensor:
            self.unsupported(f"in-place {sig.name} on a shared tensor with per-example data")
        if (type(x.node) is Node and x.node.sig.view) or x.node.id in self.viewed:
            self.unsupported(f"in-place {sig.name} on a per-example tensor that shares "
                             "storage with another (a view, or viewed)")
        out = self.record(*_out_of_place(fn, args, kwargs, sig, self))
        if type(out) is not LazyTensor or out.meta.shape != x.meta.shape or \
                out.meta.dtype != x.meta.dtype:
            raise TraceError(f"in-place {sig.name} would change the tensor's shape or dtype "
                             f"({where(self.example, user_site(1))}); PyTorch refuses it")
        x.node, x.index, x.meta = out.node, out.index, out.meta
        return x

    def unsupported(self, message: str):
        raise UnsupportedError(f"{message} is not supported ({where(self.example, user_site(2))})")

    def foreign(self, lazy: LazyTensor):
        """A lazy tensor of another run met while recording this one."""
        raise MixedRunError("a lazy tensor from another dynbatch run was used here "
                            f"({where(self.example, user_site(3))}); lazy tensors belong to "
                            "the @batched call or autobatch scope that made them (use `.value` "
                            "to carry a result from one run into another)")

    # -- reads: implemented by the session ------------------------------------------------
    def read(self, fn, args, kwargs):
        raise NotImplementedError

    def value_of(self, lazy: LazyTensor) -> Tensor:
        raise NotImplementedError


def _out_of_place(fn, args, kwargs, sig, tracer):
    """(fn, args, kwargs) of the out-of-place form of an in-place call."""
    name = getattr(fn, "__name__", "")
    if name == "__setitem__":
        return setitem, args, kwargs
    if name.startswith("__i"):
        return getattr(Tensor, "__" + name[3:]), args, kwargs
    if name.endswith("_"):
        plain = _OUT_OF_PLACE.get(name) or getattr(Tensor, name[:-1], None) or \
            getattr(torch, name[:-1], None)
        if plain is not None:
            return plain, args, kwargs
    if "out" in kwargs or name.endswith("_"):
        tracer.unsupported(f"{sig.name} writing into a per-example tensor (out=)")
    if "inplace" in kwargs:
        return fn, args, dict(kwargs, inplace=False)
    tracer.unsupported(f"in-place {sig.name} with `inplace` passed positionally")


_internal_files = internal_files
_SITE_CHANGES = 4       # a line whose call changed this often is recorded the general way
_GETITEM = Tensor.__getitem__
_SUM, _TORCH_SUM = Tensor.sum, torch.sum
_aten_index = torch.ops.aten.index.Tensor


def _tensor_index(args):
    """``x[i]`` with ``i`` a per-example integer tensor of no dims (``table[word]``,
    ``P[y.argmax()]``): indexing reads it as a Python int, so the call would be a read of
    its value. As advanced indexing by that tensor (ATen's index) it gives the same values
    and shape without reading it, and batches. Also where the index holds several such
    tensors and full slices (``x[:, i]``)."""
    x, index = args
    items = index if type(index) is tuple else (index,)
    if not any(type(i) is LazyTensor for i in items):
        return _GETITEM, args
    indices = []
    for i in items:
        if type(i) is LazyTensor and not i.meta.dtype.is_floating_point and \
                i.meta.dtype is not torch.bool:
            indices.append(i)
        elif type(i) is slice and i == slice(None):
            indices.append(None)
        else:
            return _GETITEM, args
    while indices and indices[-1] is None:
        indices.pop()
    return _aten_index, (x, indices)


def _filled(input, value):
    """``x.fill_(value)``, out of place."""
    return torch.full_like(input, value) if not isinstance(value, (Tensor, LazyTensor)) \
        else value.expand_as(input).to(input.dtype).clone()


# in-place methods whose out-of-place form has another name
_OUT_OF_PLACE = {"zero_": torch.zeros_like, "fill_": _filled}
