"""The rule table: one batched torch call per op, with per-example dims shifted by one
(NOTE [batch dim]). Every rule reads canonical argument names only (normalize.py) and
declines what it does not recognise; vmap then runs the call. Each rule is tested against
the per-example loop by tests/test_rules.py and the differential fuzzer.

Categories, each a helper: elementwise (broadcasting, ranks right-aligned as JAX's
broadcast_batcher does), first-argument ops (only the first argument is per-example and
the op acts on trailing dims), dim ops (named dims shifted), reductions (with dims, or over
all per-example dims), shape ops (read off the inferred output shape), joins, matmul.
Indexing and losses have modules of their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lazy import Input
from .registry import Call, register

_T = Tensor
# torch's function as imported (a run replaces the hot ones by wrappers while it records)
_matmul = torch.matmul


def _wrap(dim, rank: int):
    """A per-example dim as a non-negative int, or None when it is not a valid int dim."""
    if type(dim) is not int or not -rank <= dim < rank:
        return None
    return dim % rank


def _shifted(value, rank: int):
    """Per-example dim(s) (an int or a sequence of ints) as batched dims; None if any is
    invalid. A 0-d per-example tensor has no dim to name here: declined, so vmap keeps
    its 0-d semantics (``s.softmax(-1)`` on a 0-d ``s`` acts on that one value)."""
    if rank == 0:
        return None
    if type(value) is int:
        d = _wrap(value, rank)
        return None if d is None else d + 1
    if type(value) in (list, tuple) and value:
        dims = [_wrap(d, rank) for d in value]
        return None if None in dims else type(value)(d + 1 for d in dims)
    return None


def _rank(call: Call, name: str = "input") -> int | None:
    meta = call.meta(name)
    return None if meta is None else len(meta.shape)


def _plain(call: Call):
    target = call.target
    return lambda kw: target(**kw)


# -- elementwise ---------------------------------------------------------------------------

def elementwise(call: Call):
    """Broadcasting ops. A per-example operand of lower rank than the result gets size-1
    dims after its batch dim, so its batch dim never meets another operand's leading dim."""
    if any(type(v) in (list, tuple) and any(type(x) is Input for x in v)
           for v in call.kwargs.values()):
        return None
    ranks = {}
    out_rank = 0
    for name, value in call.kwargs.items():
        if type(value) is Input:
            ranks[name] = len(value.meta.shape)
            out_rank = max(out_rank, ranks[name])
        elif isinstance(value, Tensor):
            out_rank = max(out_rank, value.dim())
    if not ranks:
        return None
    pads = {name: out_rank - r for name, r in ranks.items() if r < out_rank}
    target = call.target
    if not pads:
        return lambda kw: target(**kw)

    def run(kw):
        for name, extra in pads.items():
            x = kw[name]
            kw[name] = x.reshape(x.shape[0], *([1] * extra), *x.shape[1:])
        return target(**kw)
    return run


_UNARY = """abs neg negative exp exp2 expm1 log log1p log2 log10 sqrt rsqrt sin cos tan sinh
cosh asin acos atan tanh sigmoid relu sign sgn floor ceil round trunc frac reciprocal square
erf erfc erfinv logit nan_to_num logical_not isnan isinf isfinite bitwise_not positive
deg2rad rad2deg angle clamp clip clamp_min clamp_max hardshrink lgamma digamma i0 sinc"""
_BINARY = """add sub subtract mul multiply div divide true_divide floor_divide remainder fmod
pow float_power maximum minimum fmax fmin atan2 arctan2 eq ne lt le gt ge greater less
greater_equal less_equal not_equal logical_and logical_or logical_xor bitwise_and bitwise_or
bitwise_xor bitwise_left_shift bitwise_right_shift where masked_fill lerp addcmul addcdiv
hypot copysign rsub xlogy heaviside nextafter isclose"""
_F_ELEMENTWISE = """relu relu6 elu selu celu gelu silu mish leaky_relu softplus softsign
hardtanh hardsigmoid hardswish logsigmoid tanhshrink softshrink hardshrink threshold sigmoid
tanh"""
_OPERATORS = """__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__
__floordiv__ __rfloordiv__ __mod__ __rmod__ __pow__ __rpow__ __invert__ __and__ __rand__
__or__ __ror__ __xor__ __rxor__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __lshift__
__rshift__"""

for _n in (_UNARY + " " + _BINARY).split():
    register(elementwise, getattr(torch, _n, None))
for _n in _F_ELEMENTWISE.split():
    if getattr(F, _n, None) is not getattr(torch, _n, None):
        register(elementwise, getattr(F, _n, None))
for _n in _OPERATORS.split():
    register(elementwise, getattr(_T, _n, None))


# -- first-argument ops --------------------------------------------------------------------

def first_arg(call: Call):
    """Ops on the trailing dims of their first argument, every other argument shared:
    conversions, clone, ``F.linear`` with a shared weight, ``F.embedding``'s indices,
    ``F.layer_norm``. The batched call is the call itself."""
    first = next(iter(call.kwargs))
    return _plain(call) if call.only(first) else None


register(first_arg, torch.clone, torch.detach, _T.contiguous, _T.to, _T.float,
         _T.double, _T.half, _T.bfloat16, _T.long, _T.int, _T.short, _T.char, _T.byte,
         _T.bool, _T.cpu, _T.cuda, torch.zeros_like, torch.ones_like, torch.full_like,
         torch.empty_like, torch.rand_like, torch.randn_like, torch.tril, torch.triu,
         F.linear, F.embedding, F.layer_norm, getattr(F, "rms_norm", None), F.dropout,
         F.alpha_dropout, torch.dropout)


def pad(call: Call):
    """Constant padding of trailing dims (the batch dim is never padded)."""
    if not call.only("input") or call.kwargs.get("mode", "constant") != "constant":
        return None
    if len(call.kwargs["pad"]) > 2 * _rank(call):
        return None
    return _plain(call)


register(pad, F.pad)


def type_as(call: Call):
    other = call.meta("other")
    if other is None:
        return first_arg(call)
    return lambda kw: kw["input"].to(other.dtype)


register(type_as, _T.type_as)


def new_tensor_like(call: Call):
    """``x.new_zeros(size)``: one tensor of that size per example."""
    if not call.only("input"):
        return None
    target = call.target

    def run(kw):
        kw["size"] = (kw["input"].shape[0], *kw["size"])
        return target(**kw)
    return run


register(new_tensor_like, _T.new_zeros, _T.new_ones, _T.new_empty)


# -- dim ops -------------------------------------------------------------------------------

def dim_op(*names: str, extra_rank: int = 0, also: tuple = (), shared: tuple = (),
           expanded: tuple = ()):
    """Ops whose dims (the parameters ``names``) index the first argument: each dim shifted
    by one. ``extra_rank``: the op's dims range over one more dim than the input has
    (unsqueeze). ``also``: other parameters that are per-example like the input and
    shifted alike (gather's index); ``shared``: tensor parameters that must be shared;
    ``expanded``: shared tensors that take the batch dim, expanded to it (diff's prepend)."""
    def rule(call: Call):
        first = next(iter(call.kwargs))
        if not call.only(first, *also):
            return None
        if any(type(call.kwargs.get(s)) is Input for s in shared + expanded):
            return None
        grow = tuple(s for s in expanded if isinstance(call.kwargs.get(s), Tensor))
        rank = _rank(call, first) + extra_rank
        edits = {}
        for name in names:
            shifted = _shifted(call.kwargs.get(name), rank)
            if shifted is None:
                return None
            edits[name] = shifted
        target = call.target

        def run(kw):
            kw.update(edits)
            for s in grow:
                kw[s] = kw[s].expand(kw[first].shape[0], *kw[s].shape)
            return target(**kw)
        return run
    return rule


def _fns(*names):
    return [f for n in names for f in (getattr(torch, n, None),)]


for _names, _rule in [
    ("softmax log_softmax cumsum cumprod cummax cummin logcumsumexp argsort sort topk "
     "narrow select chunk unbind split", dim_op("dim")),
    ("flip", dim_op("dims")),
    ("roll", dim_op("dims")),
    ("transpose swapdims", dim_op("dim0", "dim1")),
    ("swapaxes", dim_op("axis0", "axis1")),
    ("movedim moveaxis", dim_op("source", "destination")),
    ("diagonal", dim_op("dim1", "dim2")),
    ("unflatten", dim_op("dim")),
]:
    register(_rule, *_fns(*_names.split()))
register(dim_op("dim"), F.softmax, F.log_softmax, F.softmin, F.glu, F.normalize)
register(dim_op("dim", shared=("index",)), torch.index_select)
register(dim_op("dim", also=("index",)), torch.gather)
register(dim_op("dim", expanded=("prepend", "append")), torch.diff)


def t(call: Call):
    if not call.only("input"):
        return None
    if _rank(call) < 2:
        return lambda kw: kw["input"]
    return lambda kw: kw["input"].transpose(1, 2)


register(t, torch.t)


def permute(call: Call):
    if not call.only("input"):
        return None
    dims = _shifted(call.kwargs["dims"], _rank(call))
    if dims is None:
        return None
    return lambda kw: kw["input"].permute(0, *dims)


register(permute, torch.permute)


# -- shape ops: the output's values are the input's, in the same order --------------------

def reshape_to_output(call: Call):
    """view / reshape / flatten / squeeze / unsqueeze and the like: each example's values in
    their own order, reshaped to the inferred output shape. ``reshape`` even for ``view``:
    a batch of contiguous per-example tensors may be a non-contiguous batched tensor."""
    if call.per_example() - {"other"} != {"input"}:
        return None
    shape = tuple(call.outputs[0].shape)
    return lambda kw: kw["input"].reshape(kw["input"].shape[0], *shape)


register(reshape_to_output, torch.reshape, _T.view, torch.flatten, torch.squeeze,
         torch.unsqueeze, torch.ravel, _T.view_as, _T.reshape_as)


def expand(call: Call):
    """New leading dims go after the batch dim, never against it."""
    if call.per_example() - {"other"} != {"input"}:
        return None
    rank = _rank(call)
    out = tuple(call.outputs[0].shape)
    extra = len(out) - rank

    def run(kw):
        x = kw["input"]
        n = x.shape[0]
        return x.reshape(n, *([1] * extra), *x.shape[1:]).expand(n, *out)
    return run


register(expand, _T.expand, _T.expand_as, torch.broadcast_to)


def repeat(call: Call):
    if not call.only("input"):
        return None
    repeats = tuple(call.kwargs["repeats"])
    extra = len(repeats) - _rank(call)
    if extra < 0:
        return None

    def run(kw):
        x = kw["input"]
        return x.reshape(x.shape[0], *([1] * extra), *x.shape[1:]).repeat(1, *repeats)
    return run


register(repeat, _T.repeat)


# -- reductions ----------------------------------------------------------------------------

def reduction(call: Call):
    """sum / mean / amax / max / std / norm / ... over named dims (shifted), or over every
    per-example dim (flattened per example, reduced on dim 1, reshaped to the output)."""
    if isinstance(call.kwargs.get("other"), (Tensor, Input)):   # torch.max(a, b)
        return elementwise(call)
    if not call.only("input"):
        return None
    rank = _rank(call)
    dim = call.kwargs.get("dim")
    target = call.target
    if dim is not None and dim != [] and dim != ():
        shifted = _shifted(dim, rank)
        if shifted is None:
            return None

        def run(kw):
            kw["dim"] = shifted
            return target(**kw)
        return run
    if isinstance(call.kwargs.get("p"), str) and call.kwargs["p"] != "fro":
        return None         # a matrix norm over all dims (nuc): not a vector reduction
    shape = tuple(call.outputs[0].shape)
    single = len(call.outputs) == 1
    if "unbiased" in call.kwargs:       # std/var(input, unbiased): that overload has no
        plain = getattr(target, "fn", target)   # dim; the keyword form takes both
        target = lambda **kw: plain(**kw)  # noqa: E731

    def run_all(kw):
        x = kw["input"]
        kw["input"] = x.reshape(x.shape[0], -1)
        kw["dim"] = 1
        if "keepdim" in kw:
            kw["keepdim"] = False
        out = target(**kw)
        if single and not isinstance(out, Tensor):      # max() -> (values, indices)
            out = out[0]
        return out.reshape(x.shape[0], *shape)
    return run_all if single else None


register(reduction, *_fns("sum", "mean", "prod", "amax", "amin", "max", "min", "argmax",
                          "argmin", "logsumexp", "norm", "std", "var", "all", "any",
                          "count_nonzero", "nansum", "nanmean", "median", "nanmedian"),
         torch.linalg.vector_norm)


# -- joins ---------------------------------------------------------------------------------

def join(stack: bool):
    """torch.cat (or torch.stack): shared members are expanded along the batch dim."""
    def rule(call: Call):
        if not call.only("tensors"):
            return None
        members = call.kwargs["tensors"]
        metas = [m.meta if type(m) is Input else None for m in members]
        rank = len(next(m for m in metas if m is not None).shape)
        dim = _shifted(call.kwargs["dim"], rank + stack)
        if dim is None:
            return None
        return _joined(call.target, metas, dim)
    return rule


def _joined(target, metas, dim):
    flags = [m is not None for m in metas]

    def run(kw):
        tensors = kw["tensors"]
        if not all(flags):
            n = next(t for t, f in zip(tensors, flags) if f).shape[0]
            tensors = [t if f else t.expand(n, *t.shape) for t, f in zip(tensors, flags)]
        kw["tensors"] = tensors
        kw["dim"] = dim
        return target(**kw)
    return run


register(join(False), torch.cat, torch.concat, torch.concatenate)
register(join(True), torch.stack)


# -- matmul --------------------------------------------------------------------------------

def matmul(call: Call):
    """matmul and its special cases (mm, mv, dot: the same product on their ranks)."""
    if len(call.kwargs) != 2:
        return None
    first, second = call.kwargs
    a, b = call.kwargs[first], call.kwargs[second]
    if not isinstance(a, (Tensor, Input)) or not isinstance(b, (Tensor, Input)):
        return None
    pa, pb = type(a) is Input, type(b) is Input
    ra = len(a.meta.shape) if pa else a.dim()
    rb = len(b.meta.shape) if pb else b.dim()
    mm = _matmul
    if pa and not pb:
        if rb <= 2 and ra >= 1:
            return lambda kw: mm(kw[first], kw[second])
    elif pb and not pa:
        if ra == 2 and rb == 1:
            return lambda kw: mm(kw[second], kw[first].t())
        if ra == 1 and rb == 1:
            return lambda kw: mm(kw[second], kw[first])
        if ra <= 2 and rb >= 2:
            return lambda kw: mm(kw[first], kw[second])
    elif pa and pb:
        if ra == rb == 1:
            return lambda kw: (kw[first] * kw[second]).sum(-1)
        if ra >= 2 and ra == rb:
            return lambda kw: mm(kw[first], kw[second])
        if ra == 2 and rb == 1:
            return lambda kw: mm(kw[first], kw[second].unsqueeze(-1)).squeeze(-1)
        if ra == 1 and rb == 2:
            return lambda kw: mm(kw[first].unsqueeze(1), kw[second]).squeeze(1)
    return None


register(matmul, torch.matmul, torch.mm, torch.mv, torch.dot, _T.__matmul__)
