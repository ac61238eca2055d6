"""Blocks: a module or function call recorded as ONE node and batched as a whole.

Built-in modules (native.py: nn.Linear, nn.Embedding, nn.LayerNorm, the RNN cells, and
nn.LSTM, nn.GRU, nn.RNN on an unbatched sequence) batch natively. ``db.block`` marks user
functions, nn.Module subclasses and module instances: a user block's body is traced once
per signature (per run) into the same op vocabulary and compiled into a replay of the
whole batch (codegen.py). A body that reads a value is recorded op by op instead. A module
with hooks is never a block: its hooks then fire per example, as in eager code. While a
run records, ``nn.Module.__call__`` is patched so that block calls reach the tracer.
"""
from __future__ import annotations

import functools
import threading
from sys import _getframe

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import codegen, native
from .errors import BlockError, TraceError, user_site, warn_at, where
from .intercept import holds_lazy
from .lazy import LazyTensor, current
from .rules import ragged
from .signature import BLOCK, Signature, call_key, name_of, wrapper
from .state import state_now
from .template import filler, template_of
from .trace import Tracer

INLINE = "inline"       # a block whose body reads a value: recorded op by op
_original_call = native.original_call
_module_state = nn.modules.module
_mode_enabled = torch._C._is_torch_function_mode_enabled


def global_hooks() -> bool:
    """Whether any module hook is registered for every module."""
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks
                or _module_state._global_backward_hooks
                or _module_state._global_backward_pre_hooks)


def is_block(module: nn.Module, hooked: bool = False) -> bool:
    """Whether calls of ``module`` are blocks; ``hooked``: global hooks are registered."""
    # the mark lives on the class (db.block(SomeModule)) or in the instance's __dict__
    # (db.block(module)); read there, not through nn.Module.__getattr__
    t = type(module)
    if t not in native.BUILTIN_BLOCKS and not getattr(t, "_dynbatch_block", False) and \
            not module.__dict__.get("_dynbatch_block", False):
        return False
    return not (hooked or module._forward_hooks or module._forward_pre_hooks or
                module._backward_hooks or module._backward_pre_hooks or
                "forward" in module.__dict__)


def _module_call(self, *args, **kwargs):
    tracer = current.tracer
    if tracer is not None and _mode_enabled():
        if type(self) is _Dropout and _drops_nothing(self, args, kwargs, tracer.hooked):
            return args[0]
        if is_block(self, tracer.hooked) and \
                ((args and type(args[0]) is LazyTensor) or holds_lazy(args, kwargs)):
            return record_block(tracer, self, args, kwargs)
    return _original_call(self, *args, **kwargs)


_Dropout = nn.Dropout


def _drops_nothing(module, args, kwargs, hooked: bool) -> bool:
    """NOTE [identity dropout] (intercept.py) at the module: an ``nn.Dropout`` in eval mode or
    with p == 0 returns its input, the same object, as its forward's F.dropout would,
    without the calls through Module.__call__, forward and F.dropout. Only where the call
    would run nothing else: no hook, no forward of the instance's own, not in place."""
    return len(args) == 1 and not kwargs and type(args[0]) is LazyTensor and \
        (not module.training or module.p == 0) and not module.inplace and not hooked and \
        not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
             or module._backward_pre_hooks) and "forward" not in module.__dict__


_lock = threading.Lock()
_installed = [0]


def install() -> None:
    with _lock:
        if _installed[0] == 0:
            nn.Module.__call__ = _module_call
        _installed[0] += 1


def uninstall() -> None:
    with _lock:
        _installed[0] -= 1
        if _installed[0] == 0:
            nn.Module.__call__ = _original_call


class BlockFunction:
    """A function marked with ``db.block``: the identity its nodes' signatures name.
    ``compile_options``: torch.compile's keywords for its replay, None to replay as is.
    ``key``: (module, qualname, k), k counting earlier marks of a function of that name
    in this process; marks made at import time get the same key in every process that
    imports the module (refs.py names a block by it)."""

    def __init__(self, fn, compile_options: dict | None = None):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.compile_options = compile_options
        marks = _marks.setdefault((fn.__module__, fn.__qualname__), [])
        self.key = (fn.__module__, fn.__qualname__, len(marks))
        marks.append(self)

    def __repr__(self) -> str:
        return f"<dynbatch block {self.fn.__qualname__}>"


_marks: dict = {}     # (module, qualname) -> the BlockFunctions marked, in order


def marked(key: tuple) -> BlockFunction | None:
    """The BlockFunction with this ``key`` in this process, if one was marked."""
    marks = _marks.get(key[:2], ())
    return marks[key[2]] if key[2] < len(marks) else None


def block(obj=None, *, compile=False):
    """Mark a function, an nn.Module subclass or a module instance as a block: each call is
    recorded as one node and batched as a whole. It must be a pure function of its
    arguments (no reads of tensor values, no randomness, no state changes)::

        @db.block
        def cell(x, h, W):
            return torch.tanh(W @ torch.cat([x, h]))

    ``compile=True`` (or a dict of torch.compile's keyword arguments, such as
    ``{"backend": "aot_eager"}``) runs the block's batched body through
    ``torch.compile(..., dynamic=True)``: NOTE [compiled blocks] in codegen.py. It applies
    to blocks whose body dynbatch traces, not to the built-in modules (Linear, LSTMCell,
    ...), which are one batched torch call already.
    """
    options = _compile_options(compile)
    if obj is None:
        return lambda o: block(o, compile=compile)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        obj._dynbatch_block = True
        obj._dynbatch_compile = options
        return obj
    if isinstance(obj, nn.Module):
        object.__setattr__(obj, "_dynbatch_block", True)
        object.__setattr__(obj, "_dynbatch_compile", options)
        return obj
    marked = getattr(obj, "__dynbatch_block__", None)
    if isinstance(marked, BlockFunction):
        if marked.compile_options != options:
            raise ValueError(f"{marked.fn.__qualname__} is a block already, with compile="
                             f"{marked.compile_options is not None}; mark the function "
                             "itself again for another compile setting")
        return obj
    if not callable(obj):
        raise TypeError(f"db.block expects a function, an nn.Module subclass or a module, "
                        f"got {type(obj).__name__}")
    marked = BlockFunction(obj, options)

    @functools.wraps(obj)
    def block_call(*args, **kwargs):
        tracer = current.tracer
        if tracer is not None and _mode_enabled():
            return record_block(tracer, marked, args, kwargs)
        return obj(*args, **kwargs)

    block_call.__dynbatch_block__ = marked
    return block_call


def _compile_options(compile) -> dict | None:
    """``db.block``'s ``compile`` as torch.compile's keywords (None: not compiled)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        return dict(compile)
    raise TypeError(f"db.block's compile must be True, False or a dict of torch.compile's "
                    f"keyword arguments, got {compile!r}")


def compile_options(fn) -> dict | None:
    """The torch.compile keywords a block's replay runs under (None: replayed as is): the
    mark on the function, the module instance or its class."""
    if isinstance(fn, BlockFunction):
        return fn.compile_options
    own = fn.__dict__.get("_dynbatch_compile", _UNSET)
    return getattr(type(fn), "_dynbatch_compile", None) if own is _UNSET else own


_UNSET = object()


def call_body(fn, args, kwargs):
    """A block's own code on real or lazy values (no block recording of ``fn`` itself)."""
    if isinstance(fn, nn.Module):
        return _original_call(fn, *args, **kwargs)
    return fn.fn(*args, **kwargs)


class BlockCall:
    """A block called as a function: its signature's per-example call."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return call_body(self.fn, args, kwargs)


def record_block(tracer, fn, args, kwargs):
    """Record one block call as one node; its signature lives for this run (a module's
    parameters may be replaced between runs).

    A line that repeats its last block call records it in one step (NOTE [call sites] in
    trace.py)."""
    frame = _getframe(2)        # the module's or block's caller
    out = tracer.replayed(frame, fn, args, kwargs)
    if out is not None:
        return out
    state = state_now()
    key, inputs, outs, _ = call_key(fn, state, args, kwargs, tracer)
    if not inputs:          # no per-example tensor among the arguments: a plain call
        return call_body(fn, args, kwargs)
    sig = tracer.signatures.get(key)
    if sig is None:
        sig = tracer.signatures[key] = _block_signature(tracer, fn, args, kwargs, state)
        if sig.ragged is not None:
            sig.family = ragged.family_of(key, sig)
    if sig.kind is INLINE:
        return call_body(fn, args, kwargs)
    site = user_site(2)
    tracer.remember(frame, fn, args, kwargs, sig, site)
    return tracer.append(sig, inputs, outs, site)


def _block_signature(tracer, fn, args, kwargs, state) -> Signature:
    targs, tkwargs, metas, _ = template_of(args, kwargs)
    return block_signature(fn, targs, tkwargs, metas, state, tracer, user_site(3))


def block_signature(fn, targs, tkwargs, metas, state, tracer, site) -> Signature:
    """The signature of a block call's template; ``tracer`` (None in refs.py's rebuild)
    names the example in messages."""
    name = name_of(fn)
    if isinstance(fn, nn.Module) and type(fn) in native.BUILTIN_BLOCKS:
        with torch._C.DisableTorchFunction():   # dynbatch's own calls, not the user's
            sig = native.signature(fn, targs, tkwargs, metas, state, name,
                                   _example(tracer), site, BlockCall(fn),
                                   tracer.modules if tracer is not None else None)
    else:
        sig = _traced_signature(fn, targs, tkwargs, metas, state, name, tracer, site)
    sig.site = site
    sig.source = ("block", fn, targs, tkwargs)
    return sig


# -- user blocks: the body traced once, replayed for a batch -------------------------------

def _example(tracer):
    return tracer.example if tracer is not None else None


class BodyTracer(Tracer):
    """Records a block's body once, on placeholders of its per-example arguments. Its
    replay batches each node over the block's batch, whose members all have the same
    body: no fused patterns, which batch nodes of different shapes."""

    fuses = False

    def __init__(self, outer: Tracer | None):
        super().__init__()
        self.example = _example(outer)

    def read(self, fn, args, kwargs):
        raise BlockError(f"{name_of(fn)} reads a tensor's value inside a block")

    def value_of(self, lazy):
        raise BlockError("a block's body reads a tensor's value")


def _traced_signature(fn, targs, tkwargs, metas, state, name, tracer, site) -> Signature:
    body = BodyTracer(tracer)
    arguments = []
    for k, meta in enumerate(metas):
        arg = codegen.Argument(~k, None, meta, body)
        arg.k = k
        body.graph.constants.append(arg)
        arguments.append(arg)
    fill = filler(targs, tkwargs)
    args, kwargs = fill([LazyTensor(a, 0, a.meta) for a in arguments])
    outer = current.tracer
    current.tracer = body
    try:
        out = call_body(fn, args, kwargs)
    except BlockError as err:
        warn_at(f"dynbatch: block {name} cannot be traced once for a whole batch ({err}); "
                "it is recorded op by op", site)
        return Signature(INLINE, fn, name, state)
    except Exception as err:
        if isinstance(err, TraceError):
            raise
        raise TraceError(f"block {name} failed for {where(_example(tracer), site)}\n"
                         f"  {type(err).__name__}: {err}") from err
    finally:
        current.tracer = outer
    lazies = codegen.returned_lazies(out)
    if lazies is None or any(lt.node.owner is not body for lt in lazies):
        raise BlockError(f"block {name} must return per-example tensors it computed (a "
                         f"tensor or a structure of them), got {type(out).__name__} "
                         f"({where(_example(tracer), site)})")
    leaves_spec = tree_flatten(out)[1]
    outputs = tuple(lt.meta for lt in lazies)
    sig = Signature(BLOCK, fn, name, state, metas, outputs,
                    wrapper(None if leaves_spec.is_leaf() else leaves_spec, outputs))
    sig.single = outputs[0] if leaves_spec.is_leaf() else None
    sig.target = BlockCall(fn)
    sig.template = (targs, tkwargs)
    sig.fill = fill
    options = compile_options(fn)
    try:
        sig.batched = codegen.compile_body(body.graph, arguments, lazies, name, state,
                                           options)
    except Exception as err:
        if options is None:
            raise
        raise TraceError(f"block {name}: torch.compile(**{options!r}) failed for "
                         f"{where(_example(tracer), site)}\n"
                         f"  {type(err).__name__}: {err}") from err
    sig.how = "block" if options is None else "compiled"
    return sig
