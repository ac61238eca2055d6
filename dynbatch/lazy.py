"""LazyTensor, the stand-in for a per-example tensor while a run records; TensorMeta, what
is known of it before it is computed; and the thread's current tracer.

A LazyTensor holds the node that will compute it and which output of that node. Its
shape, dtype, device and requires_grad are known at once (they were inferred for its
signature), so per-example code may branch on them. Tensor methods and operators are
generated from name lists and go to the tracer of this thread; torch functions reach it
through the run's TorchFunctionMode or ``__torch_function__``. Reading a value (``item``,
``bool``, ``tolist``...) asks the lazy tensor's run for it, which executes what is
pending, batched, first.
"""
from __future__ import annotations

import threading

import torch
from torch.utils._pytree import tree_map_only

Tensor = torch.Tensor
_DisableTorchFunction = torch._C.DisableTorchFunction


class _Current(threading.local):
    tracer = None       # the tracer recording in this thread (trace.Tracer), or None


current = _Current()


class TensorMeta:
    """Shape, dtype, device and requires_grad of a per-example tensor. Interned by
    ``meta_of``: equal metas are one object, so they compare and hash by identity, which
    keeps the signature keys that hold them cheap to hash and compare."""

    __slots__ = ("shape", "dtype", "device", "requires_grad", "__weakref__")

    def __reduce__(self):
        return meta_of, (tuple(self.shape), self.dtype, self.device, self.requires_grad)

    def __repr__(self) -> str:
        grad = ", requires_grad" if self.requires_grad else ""
        return f"TensorMeta({tuple(self.shape)}, {self.dtype}, {self.device}{grad})"


_METAS: dict = {}


def meta_of(shape, dtype: torch.dtype, device: torch.device, requires_grad: bool = False
            ) -> TensorMeta:
    if type(device) is not torch.device:
        with _DisableTorchFunction():       # (torch.device() reaches a run's mode)
            device = torch.device(device)
    key = (tuple(shape), dtype, device, bool(requires_grad))
    meta = _METAS.get(key)
    if meta is None:
        meta = TensorMeta()
        meta.shape = torch.Size(key[0])
        meta.dtype, meta.device, meta.requires_grad = key[1], key[2], key[3]
        meta = _METAS.setdefault(key, meta)     # another thread may have made it first
    return meta


def meta_of_tensor(t: Tensor) -> TensorMeta:
    return meta_of(t.shape, t.dtype, t.device, t.requires_grad)


def with_length(meta: TensorMeta, length: int) -> TensorMeta:
    """``meta`` with ``length`` as dim 0 (-1: a sequence of any length, in the keys of
    ragged forms: NOTE [ragged groups] in rules/ragged.py)."""
    return meta_of((length,) + tuple(meta.shape[1:]), meta.dtype, meta.device,
                   meta.requires_grad)


class Input:
    """Marks where a per-example tensor sits in a signature's template: the ``k``-th
    per-example input of the call, whose meta is ``meta``. The batched call gets, in its
    place, the batched tensor of all the batch's k-th inputs."""

    __slots__ = ("k", "meta")

    def __init__(self, k: int, meta: TensorMeta):
        self.k, self.meta = k, meta

    def __reduce__(self):
        return Input, (self.k, self.meta)

    def __repr__(self) -> str:
        return f"Input({self.k}, {self.meta!r})"


class _PendingGradFn:
    """``x.grad_fn`` of a lazy tensor that will have one: not None, as in eager."""

    def __repr__(self) -> str:
        return "<grad_fn of a pending dynbatch value>"


PENDING_GRAD_FN = _PendingGradFn()


class LazyTensor:
    """A per-example tensor whose value is not computed yet.

    ``.value`` (or ``db.force(x)``) gives the real ``torch.Tensor``, executing pending work
    first. Shape, dtype, device and requires_grad are known at once::

        with db.autobatch() as run:
            ys = [torch.tanh(torch.tensor([float(i)])) for i in range(3)]
        ys[2].value        # tensor([0.9951])
    """

    __slots__ = ("node", "index", "meta", "_value")

    def __init__(self, node, index: int, meta: TensorMeta):
        self.node = node
        self.index = index
        self.meta = meta
        self._value = None

    # -- facts known at record time -------------------------------------------------------
    shape = property(lambda self: self.meta.shape)
    dtype = property(lambda self: self.meta.dtype)
    device = property(lambda self: self.meta.device)
    requires_grad = property(lambda self: self.meta.requires_grad)
    ndim = property(lambda self: len(self.meta.shape))
    is_cuda = property(lambda self: self.meta.device.type == "cuda")
    layout = property(lambda self: torch.strided)
    grad = property(lambda self: None)

    @property
    def is_leaf(self) -> bool:
        # a value computed by a recorded call is a leaf only when it does not require grad
        return not self.meta.requires_grad or self.node.id < 0

    @property
    def grad_fn(self):
        return None if self.is_leaf else PENDING_GRAD_FN

    def size(self, dim: int | None = None):
        return self.meta.shape if dim is None else self.meta.shape[dim]

    def dim(self) -> int:
        return len(self.meta.shape)

    ndimension = dim

    def numel(self) -> int:
        return self.meta.shape.numel()

    nelement = numel

    def element_size(self) -> int:
        return torch.empty((), dtype=self.meta.dtype).element_size()

    def is_floating_point(self) -> bool:
        return self.meta.dtype.is_floating_point

    def is_complex(self) -> bool:
        return self.meta.dtype.is_complex

    def __len__(self) -> int:
        if not self.meta.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.meta.shape[0]

    # -- concrete values ------------------------------------------------------------------
    @property
    def value(self) -> Tensor:
        """The real tensor (executes pending work of this lazy tensor's run if needed)."""
        if self._value is None:
            self._value = self.node.owner.value_of(self)
        return self._value

    def _read(self, fn):
        value = self.value
        with _DisableTorchFunction():
            return fn(value)

    def item(self):
        return self._read(Tensor.item)

    def tolist(self):
        return self._read(Tensor.tolist)

    def numpy(self):
        return self._read(Tensor.numpy)

    def __bool__(self) -> bool:
        return self._read(bool)

    def __int__(self) -> int:
        return self._read(int)

    def __float__(self) -> float:
        return self._read(float)

    def __index__(self) -> int:
        return self._read(Tensor.__index__)

    def __complex__(self) -> complex:
        return self._read(complex)

    def __array__(self, dtype=None):
        arr = self._read(lambda v: v.detach().cpu().numpy())
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        node = self.node
        done = node.id < 0 or node.owner.graph.computed(node.id)
        return (f"LazyTensor(shape={tuple(self.meta.shape)}, dtype={self.meta.dtype}, "
                f"{'computed' if done else 'pending'}, node=%{node.id})")

    def __format__(self, spec: str) -> str:
        return format(self.value, spec) if spec else repr(self)

    def __iter__(self):
        if not self.meta.shape:
            raise TypeError("iteration over a 0-d tensor")
        return iter(record(Tensor.unbind, (self, 0), {}))

    # -- recorded calls -------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return record(func, args, kwargs or {})

    def __getitem__(self, index):
        return record(Tensor.__getitem__, (self, index), {})

    def __setitem__(self, index, value):
        record(Tensor.__setitem__, (self, index, value), {})

    T = property(lambda self: record(Tensor.permute, (self, tuple(range(self.ndim - 1, -1, -1))),
                                     {}) if self.ndim >= 2 else self)
    mT = property(lambda self: record(Tensor.transpose, (self, -2, -1), {}))
    H = property(lambda self: record(Tensor.adjoint, (self,), {}) if self.ndim >= 2 else self)
    data = property(lambda self: record(Tensor.detach, (self,), {}))

    def __getattr__(self, name: str):
        # Tensor methods not generated below still record, at a small extra cost per call
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(Tensor, name, None)
        if attr is None or not callable(attr):
            raise AttributeError(f"'LazyTensor' has no attribute {name!r} (torch.Tensor has "
                                 f"{'no such' if attr is None else 'a non-callable'} attribute)")
        return lambda *args, **kwargs: record(attr, (self,) + args, kwargs)


def record(fn, args, kwargs):
    """``fn(*args, **kwargs)`` with lazy tensors among the arguments: recorded by this
    thread's tracer; outside any run (a lazy tensor kept after its run), computed eagerly
    on the values."""
    tracer = current.tracer
    if tracer is None:
        return call_on_values(fn, args, kwargs)
    return tracer.record(fn, args, kwargs)


def call_on_values(fn, args, kwargs):
    args, kwargs = tree_map_only(LazyTensor, lambda lt: lt.value, (args, kwargs))
    with _DisableTorchFunction():
        return fn(*args, **kwargs)


# Tensor methods generated as real methods: the common ones skip __getattr__.
_METHODS = """
abs acos acosh add addcdiv addcmul addmm all amax amin any argmax argmin argsort asin atan
atan2 bmm bool ceil chunk clamp clamp_max clamp_min clip clone contiguous cos cosh count_nonzero
cpu cuda cummax cummin cumprod cumsum detach diag diagonal div double eq erf exp expand
expand_as expm1 flatten flip float floor floor_divide fmod gather ge gt half index_select int
isnan isinf le lerp log log10 log1p log2 log_softmax logical_and logical_not logical_or
logsumexp long lt masked_fill matmul max maximum mean median min minimum mm mul mv narrow ne neg
nan_to_num norm outer permute pow prod reciprocal relu remainder repeat reshape reshape_as
roll round rsqrt select sigmoid sign sin sinh softmax sort split sqrt square squeeze std sub sum
swapaxes t tan tanh to topk transpose true_divide trunc type_as unbind unflatten unsqueeze var
view view_as where movedim tril triu dot new_zeros new_ones new_full new_tensor new_empty
exp2 logit hardshrink nonzero masked_select unique repeat_interleave
"""

_OPERATORS = """
__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__
__rfloordiv__ __mod__ __rmod__ __pow__ __rpow__ __matmul__ __rmatmul__ __neg__ __pos__ __abs__
__invert__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __lshift__ __rshift__
__eq__ __ne__ __lt__ __le__ __gt__ __ge__
__iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__ __imatmul__
__iand__ __ior__ __ixor__ __ilshift__ __irshift__
"""


def _make_method(fn):
    def method(self, *args, **kwargs):
        tracer = current.tracer
        if tracer is None:
            return call_on_values(fn, (self,) + args, kwargs)
        return tracer.record(fn, (self,) + args, kwargs)
    method.__name__ = fn.__name__
    method.__doc__ = f"Recorded {fn.__qualname__}."
    return method


for _name in _METHODS.split() + _OPERATORS.split():
    _fn = getattr(Tensor, _name, None)
    if _fn is not None:
        setattr(LazyTensor, _name, _make_method(_fn))
LazyTensor.__hash__ = object.__hash__   # defining __eq__ above would otherwise drop it
del _name, _fn
