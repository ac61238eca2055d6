"""LazyTensor: the stand-in for a per-example tensor while a run records.

It holds the node that will compute it (and which output of that node), plus the shape,
dtype and device inferred at record time, so user code may branch on ``x.shape``. Torch
functions reach dynbatch through ``__torch_function__`` (or the run's TorchFunctionMode);
Tensor methods and operators are generated here from name lists and go straight to
``trace.record``. Reading a value (``item``, ``bool``, ``tolist``...) forces it: everything
pending runs, batched, first.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor
_DisableTorchFunction = torch._C.DisableTorchFunction

# Filled in by trace.py at import (trace imports this module; this avoids the cycle).
_record = None          # (fn, args, kwargs) -> LazyTensor | structure
_dispatch = None        # __torch_function__ entry
_force = None           # LazyTensor -> torch.Tensor
_unsupported = None     # (message) -> raises UnsupportedError at the user's site


class LazyTensor:
    """A per-example tensor whose value is not computed yet.

    ``.value`` (or ``db.force(x)``) gives the real ``torch.Tensor``, executing pending work
    first. Shape, dtype and device are known at once::

        with db.autobatch() as run:
            ys = [torch.tanh(torch.tensor([float(i)])) for i in range(3)]
        ys[2].value        # tensor([0.9951])
    """

    __slots__ = ("node", "index", "tkey", "_value")

    def __init__(self, node, index: int, tkey: tuple):
        self.node = node
        self.index = index
        self.tkey = tkey          # (shape, dtype, device): the signature's view of this input
        self._value = None

    # -- facts known at record time -------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.tkey[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.tkey[1]

    @property
    def device(self) -> torch.device:
        return self.tkey[2]

    @property
    def ndim(self) -> int:
        return len(self.tkey[0])

    def size(self, dim: int | None = None):
        return self.tkey[0] if dim is None else self.tkey[0][dim]

    def dim(self) -> int:
        return len(self.tkey[0])

    ndimension = dim

    def numel(self) -> int:
        return self.tkey[0].numel()

    nelement = numel

    def __len__(self) -> int:
        if not self.tkey[0]:
            raise TypeError("len() of a 0-d tensor")
        return self.tkey[0][0]

    def is_floating_point(self) -> bool:
        return self.tkey[1].is_floating_point

    def is_complex(self) -> bool:
        return self.tkey[1].is_complex

    @property
    def is_cuda(self) -> bool:
        return self.tkey[2].type == "cuda"

    @property
    def layout(self):
        return torch.strided

    @property
    def requires_grad(self) -> bool:
        return False  # unknown until executed; no user branch should need it mid-trace

    @property
    def grad(self):
        return None

    # -- concrete values ------------------------------------------------------------------
    @property
    def value(self) -> torch.Tensor:
        """The real tensor (executes pending work of this lazy tensor's run if needed)."""
        if self._value is None:
            self._value = _force(self)
        return self._value

    # Reads run with torch functions disabled: the value is a plain tensor, and sending its
    # .item() through the run's mode again would cost ~6 us for nothing.
    def item(self):
        value = self.value
        with _DisableTorchFunction():
            return value.item()

    def tolist(self):
        value = self.value
        with _DisableTorchFunction():
            return value.tolist()

    def numpy(self):
        value = self.value
        with _DisableTorchFunction():
            return value.numpy()

    def __bool__(self) -> bool:
        value = self.value
        with _DisableTorchFunction():
            return bool(value)

    def __int__(self) -> int:
        value = self.value
        with _DisableTorchFunction():
            return int(value)

    def __float__(self) -> float:
        value = self.value
        with _DisableTorchFunction():
            return float(value)

    def __index__(self) -> int:
        value = self.value
        with _DisableTorchFunction():
            return value.__index__()

    def __complex__(self) -> complex:
        value = self.value
        with _DisableTorchFunction():
            return complex(value)

    def __array__(self, dtype=None):
        arr = self.value.detach().cpu().numpy()
        return arr if dtype is None else arr.astype(dtype)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        shape = tuple(self.tkey[0])
        state = "executed" if self.node.batch is not None else "pending"
        return f"LazyTensor(shape={shape}, dtype={self.tkey[1]}, {state}, node=%{self.node.id})"

    def __format__(self, spec: str) -> str:
        if spec:
            return format(self.value, spec)
        return repr(self)

    def __iter__(self):
        if not self.tkey[0]:
            raise TypeError("iteration over a 0-d tensor")
        return iter(_record(Tensor.unbind, (self, 0), {}))

    # -- recorded ops ---------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def __getitem__(self, index):
        return _record(Tensor.__getitem__, (self, index), {})

    def __setitem__(self, index, value):
        _unsupported("item assignment `x[...] = v` on a per-example tensor")

    @property
    def T(self):
        n = len(self.tkey[0])
        return self if n < 2 else _record(Tensor.permute, (self, tuple(range(n - 1, -1, -1))), {})

    @property
    def mT(self):
        return _record(Tensor.transpose, (self, -2, -1), {})

    @property
    def data(self):
        return _record(Tensor.detach, (self,), {})

    def __getattr__(self, name: str):
        # Tensor methods not generated below still record, at a small extra cost per call.
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(Tensor, name, None)
        if attr is None or not callable(attr):
            raise AttributeError(f"'LazyTensor' has no attribute {name!r} (torch.Tensor has "
                                 f"{'no such' if attr is None else 'a non-callable'} attribute)")
        if name.endswith("_"):
            _unsupported(f"in-place Tensor.{name} on a per-example tensor")
        return lambda *args, **kwargs: _record(attr, (self,) + args, kwargs)


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
exp2 logit hardshrink zero_ nonzero masked_select unique repeat_interleave
"""

_OPERATORS = """
__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__
__rfloordiv__ __mod__ __rmod__ __pow__ __rpow__ __matmul__ __rmatmul__ __neg__ __pos__ __abs__
__invert__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __lshift__ __rshift__
__eq__ __ne__ __lt__ __le__ __gt__ __ge__
"""

_INPLACE_OPERATORS = """
__iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__ __imatmul__
__iand__ __ior__ __ixor__ __ilshift__ __irshift__
"""


def _make_method(fn):
    def method(self, *args, **kwargs):
        return _record(fn, (self,) + args, kwargs)
    method.__name__ = fn.__name__
    method.__doc__ = f"Recorded {fn.__qualname__}."
    return method


def _make_inplace_operator(name: str):
    plain = "__" + name[3:]

    def method(self, other):
        # `x += y` rebinding the name is what the user means; there is no alias to keep in
        # sync because lazy tensors are never views of user-visible storage.
        return getattr(self, plain)(other)
    method.__name__ = name
    return method


for _name in _METHODS.split():
    if _name.endswith("_"):
        continue
    _fn = getattr(Tensor, _name, None)
    if _fn is not None:
        setattr(LazyTensor, _name, _make_method(_fn))
for _name in _OPERATORS.split():
    setattr(LazyTensor, _name, _make_method(getattr(Tensor, _name)))
for _name in _INPLACE_OPERATORS.split():
    setattr(LazyTensor, _name, _make_inplace_operator(_name))
LazyTensor.__hash__ = object.__hash__  # defining __eq__ above would otherwise drop it
del _name, _fn


def map_lazy(args, kwargs, f, shared=None):
    """(args, kwargs) with every lazy tensor, also inside lists and tuples, replaced by
    ``f(lazy)``, and every real tensor by ``shared(tensor)`` when given."""
    return (tuple(_map_one(a, f, shared) for a in args),
            {k: _map_one(v, f, shared) for k, v in kwargs.items()})


def _map_one(a, f, shared):
    # a module-level function, not a closure that calls itself: such a closure is a
    # reference cycle, left for the garbage collector (off while a run traces) to free
    t = type(a)
    if t is LazyTensor:
        return f(a)
    if t is list or t is tuple:
        return t(_map_one(x, f, shared) for x in a)
    if shared is not None and isinstance(a, Tensor):
        return shared(a)
    return a
