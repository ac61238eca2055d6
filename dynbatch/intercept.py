"""How torch calls reach the recording tracer. Calls on lazy tensors come through
``LazyTensor.__torch_function__`` and its generated methods (lazy.py); every other torch
call the traced code makes comes through the run's TorchFunctionMode, or through thin
wrappers of the hottest torch functions, to ``dispatch``, which sends it on: recorded (a
lazy argument), answered from metadata, read (a value is needed), or run eagerly (no
per-example input; trace.py makes its tensors constants).
"""
from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from .lazy import LazyTensor, call_on_values, current

Tensor = torch.Tensor
_DisableTorchFunction = torch._C.DisableTorchFunction
_torch_tensor = torch.tensor

# Reading a value: these run eagerly on the values of their lazy inputs.
_READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__,
          Tensor.__index__, Tensor.numpy, torch.equal, torch.allclose, Tensor.equal,
          Tensor.allclose, torch.is_nonzero, Tensor.is_nonzero, Tensor.__array__,
          Tensor.__format__, Tensor.__repr__, Tensor.__str__, Tensor.__reduce_ex__,
          Tensor.__deepcopy__, Tensor.__iter__, Tensor.__len__}
# Calls that only read metadata: answered from the metas, never recorded.
_METADATA = {Tensor.dim, Tensor.size, Tensor.numel, Tensor.is_floating_point,
             Tensor.is_complex, torch.numel, Tensor.ndimension, Tensor.nelement,
             Tensor.element_size, Tensor.is_contiguous, Tensor.get_device, Tensor.data_ptr,
             Tensor.stride, Tensor.storage_offset, torch.is_floating_point, torch.is_complex}
_ATTRIBUTES = {getattr(Tensor, name).__get__ for name in (
    "shape", "dtype", "device", "requires_grad", "is_cuda", "ndim", "layout", "grad",
    "is_leaf", "grad_fn", "data", "T", "mT", "names")
    if hasattr(getattr(Tensor, name, None), "__get__")}

# NOTE [identity dropout]: a dropout that drops nothing (p == 0, or not training: every
# dropout of a model in eval mode) returns its very input in eager PyTorch, the same
# object; so it records no node. {function: (default of training, name of training)}
_DROPOUTS = {torch.nn.functional.dropout: (True, "training"),
             torch.nn.functional.alpha_dropout: (False, "training"),
             torch.dropout: (True, "train"), torch.alpha_dropout: (True, "train")}
_SPECIAL = _READS | _METADATA | set(_DROPOUTS) | _ATTRIBUTES | {_torch_tensor}


def holds_lazy(args, kwargs) -> bool:
    return _any_lazy(args) or (bool(kwargs) and _any_lazy(kwargs.values()))


def _any_lazy(values) -> bool:
    """A lazy tensor among ``values``, or in a list or tuple among them."""
    for a in values:
        t = type(a)
        if t is LazyTensor or ((t is list or t is tuple) and
                               any(type(x) is LazyTensor for x in a)):
            return True
    return False


def dispatch(fn, args, kwargs):
    """Every torch call made while a run records comes here."""
    tracer = current.tracer
    if tracer is None:
        return call_on_values(fn, args, kwargs)
    if fn in _SPECIAL:
        return _special(tracer, fn, args, kwargs)
    if (args and type(args[0]) is LazyTensor) or holds_lazy(args, kwargs):
        return tracer.record(fn, args, kwargs)
    return tracer.eager(fn, args, kwargs)


def _special(tracer, fn, args, kwargs):
    if fn is _torch_tensor:
        return tracer.tensor(args, kwargs)
    if not holds_lazy(args, kwargs):
        if fn in _ATTRIBUTES:
            with _DisableTorchFunction():
                return fn(*args, **kwargs)
        return tracer.eager(fn, args, kwargs)
    if fn in _METADATA or fn in _ATTRIBUTES:
        stand_ins = tree_map_only(LazyTensor, lambda lt: torch.empty(
            lt.meta.shape, dtype=lt.meta.dtype, device="meta"), (args, kwargs))
        with _DisableTorchFunction():
            return fn(*stand_ins[0], **stand_ins[1])
    if fn in _DROPOUTS:
        return _dropout(tracer, fn, args, kwargs)
    return tracer.read(fn, args, kwargs)


def _dropout(tracer, fn, args, kwargs):
    """NOTE [identity dropout]."""
    x = args[0] if args else kwargs.get("input")
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    default, name = _DROPOUTS[fn]
    training = args[2] if len(args) > 2 else kwargs.get(name, default)
    if type(x) is LazyTensor and (training is False or (type(p) in (int, float) and p == 0)):
        return x
    return tracer.record(fn, args, kwargs)


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})


def mode() -> TorchFunctionMode:
    return _Mode()


# NOTE [hot functions]: a torch function reaches the mode through torch's override
# machinery, which costs more than recording the call. While any run records, the functions
# per-example code calls most often are replaced in their modules by thin wrappers that go
# straight to ``dispatch`` (torch.fx patches functions the same way). A wrapper does what
# the mode would, only when this thread records and the mode is enabled, so dynbatch's own
# calls (made under DisableTorchFunction) and other threads get the original function.
_HOT = {
    torch: ["tensor", "cat", "stack", "sigmoid", "tanh", "relu", "exp", "log", "matmul",
            "zeros", "ones", "zeros_like", "ones_like", "where", "clamp", "softmax",
            "log_softmax", "chunk", "split", "mm", "mul", "add", "sum", "mean", "max",
            "maximum", "minimum", "abs", "sqrt", "full", "arange", "concat", "unbind"],
    torch.nn.functional: ["linear", "embedding", "cross_entropy", "nll_loss", "relu",
                          "dropout", "log_softmax", "softmax", "layer_norm", "gelu", "silu",
                          "leaky_relu", "elu", "softplus", "pad", "normalize", "mse_loss"],
}
_mode_enabled = torch._C._is_torch_function_mode_enabled
_patch_lock = threading.Lock()
_patched = [0, None]        # [runs recording, [(module, name, original, wrapper)]]


def _hot_wrapper(fn):
    if fn is _torch_tensor:         # the commonest call of tree code: a word id, a label
        def tensor(*args, **kwargs):
            tracer = current.tracer
            if tracer is not None and _mode_enabled():
                return tracer.tensor(args, kwargs)
            return fn(*args, **kwargs)
        tensor.__wrapped__ = fn
        tensor.__name__ = "tensor"
        tensor.__doc__ = fn.__doc__
        return tensor

    def hot(*args, **kwargs):
        if current.tracer is not None and _mode_enabled():
            return dispatch(fn, args, kwargs)
        return fn(*args, **kwargs)
    hot.__wrapped__ = fn
    hot.__name__ = getattr(fn, "__name__", "hot")
    hot.__doc__ = getattr(fn, "__doc__", None)
    return hot


_Function = torch.autograd.Function
_original_apply = _Function.__dict__["apply"]       # a classmethod


class FunctionApply:
    """``SomeFunction.apply`` as one recorded call: a custom autograd Function handed lazy
    tensors would otherwise run its forward on them and lose its backward. One object per
    Function class (the callable its signatures name)."""

    _made: dict = {}

    def __new__(cls, function):
        made = cls._made.get(function)
        if made is None:
            made = cls._made[function] = super().__new__(cls)
            made.function = function
            made.__name__ = made.__qualname__ = f"{function.__qualname__}.apply"
        return made

    def __call__(self, *args, **kwargs):
        return _original_apply.__func__(self.function, *args, **kwargs)


@classmethod
def _apply(cls, *args, **kwargs):
    if current.tracer is not None and _mode_enabled() and holds_lazy(args, kwargs):
        return dispatch(FunctionApply(cls), args, kwargs)
    return _original_apply.__func__(cls, *args, **kwargs)


def patch_hot_functions() -> None:
    with _patch_lock:
        _patched[0] += 1
        if _patched[0] > 1:
            return
        if _patched[1] is None:
            _patched[1] = [(module, name, getattr(module, name),
                            _hot_wrapper(getattr(module, name)))
                           for module, names in _HOT.items() for name in names
                           if hasattr(module, name)]
        for module, name, _, wrapper in _patched[1]:
            setattr(module, name, wrapper)
        _Function.apply = _apply


def unpatch_hot_functions() -> None:
    with _patch_lock:
        _patched[0] -= 1
        if _patched[0] == 0:
            for module, name, original, _ in _patched[1]:
                setattr(module, name, original)
            _Function.apply = _original_apply
