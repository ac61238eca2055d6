"""Batching rules: how one callable runs for a whole batch of nodes. One table, one place.

NOTE [batch dim]: every per-example argument arrives stacked on dim 0; shared arguments
arrive as they are. A rule has the signature ``rule(fn, args, kwargs, per_example)`` where
``per_example`` mirrors ``args``: True for a batched tensor, False for anything shared, and
a tuple of such flags for a list/tuple argument (``torch.cat([a, b])``). Lazy tensors in
kwargs always go through ``vmap_rule`` (see trace.py).

``torch.func.vmap`` defines the semantics and is the default for callables without a direct
rule. Direct rules are one plain batched torch call with dims shifted by one; each is tested
against vmap. When vmap cannot batch a call either, ``loop_rule`` runs it one example at a
time: counted in ``db.stats().fallbacks``, warned once per callable, an error when STRICT.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DynbatchError

Rule = Callable[[Callable, tuple, dict, tuple], object]

RULES: dict[Callable, Rule] = {}
STRICT = False                 # tests set this: a per-example fallback becomes an error
counters = {"fallbacks": 0, "vmap": 0}
_warned: set = set()


class FallbackError(DynbatchError):
    """Raised instead of the per-example fallback when ``dynbatch.rules.STRICT`` is set."""


def register(rule: Rule, *fns: Callable) -> None:
    for fn in fns:
        if fn is None:
            continue
        # aliases (Tensor.__neg__ is Tensor.neg) may be listed twice, with the same rule
        assert RULES.get(fn, rule) is rule, f"two batching rules for {fn!r}"
        RULES[fn] = rule


def rule_for(fn: Callable) -> Rule:
    return RULES.get(fn, vmap_rule)


def name_of(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    if mod.startswith("torch") or name.startswith("TensorBase") or name.startswith("Tensor"):
        name = name.replace("TensorBase.", "Tensor.")
        if "." not in name:
            prefix = "F." if mod == "torch.nn.functional" else "torch."
            return prefix + name
    return name


# -- the generic rules ---------------------------------------------------------------------

def _flat_batched(args, per_example):
    """The batched tensors of args, in order, and a function rebuilding args from them."""
    flat = []
    for a, pe in zip(args, per_example):
        if pe is True:
            flat.append(a)
        elif type(pe) is tuple:
            flat.extend(x for x, p in zip(a, pe) if p)

    def rebuild(values):
        it = iter(values)
        out = []
        for a, pe in zip(args, per_example):
            if pe is True:
                out.append(next(it))
            elif type(pe) is tuple:
                out.append(type(a)(next(it) if p else x for x, p in zip(a, pe)))
            else:
                out.append(a)
        return tuple(out)
    return flat, rebuild


def vmap_rule(fn, args, kwargs, per_example):
    """The semantics of batching: ``torch.func.vmap`` over the per-example arguments."""
    flat, rebuild = _flat_batched(args, per_example)
    try:
        out = torch.func.vmap(lambda *xs: fn(*rebuild(xs), **kwargs))(*flat)
        counters["vmap"] += 1
        return out
    except Exception as err:  # vmap has no rule for this op: run it per example, visibly
        return loop_rule(fn, args, kwargs, per_example, reason=err)


def loop_rule(fn, args, kwargs, per_example, reason=None):
    """Per-example execution, one call per row, results stacked: correct but slow."""
    if STRICT:
        raise FallbackError(f"dynbatch would run {name_of(fn)} one example at a time "
                            f"({reason}); STRICT mode forbids it") from reason
    if fn not in _warned:
        _warned.add(fn)
        warnings.warn(f"dynbatch ran {name_of(fn)} one example at a time; no batching rule "
                      f"applies ({type(reason).__name__}: {reason})", stacklevel=2)
    flat, rebuild = _flat_batched(args, per_example)
    n = flat[0].shape[0]
    counters["fallbacks"] += n
    rows = [fn(*rebuild([t[i] for t in flat]), **kwargs) for i in range(n)]
    if isinstance(rows[0], Tensor):
        return torch.stack(rows)
    return type(rows[0])(torch.stack([r[k] for r in rows]) for k in range(len(rows[0])))


def vmap_kwargs_rule(fn, args, kwargs, paths):
    """Lazy tensors among kwargs: rare enough to always take vmap."""
    def call(*values):
        a = list(args)
        kw = dict(kwargs)
        for path, v in zip(paths, values):
            if path[0] == "kw":
                kw[path[1]] = v
            elif len(path) == 1:
                a[path[0]] = v
            else:
                seq = list(a[path[0]])
                seq[path[1]] = v
                a[path[0]] = type(a[path[0]])(seq)
        return fn(*a, **kw)
    values = []
    for path in paths:
        if path[0] == "kw":
            values.append(kwargs[path[1]])
        elif len(path) == 1:
            values.append(args[path[0]])
        else:
            values.append(args[path[0]][path[1]])
    counters["vmap"] += 1
    return torch.func.vmap(call)(*values)


# -- category helpers ----------------------------------------------------------------------

def _shift(dim):
    """A per-example dim as a batched dim: non-negative dims move right by one; negative
    dims count from the end in both and stay."""
    if dim is None:
        return None
    if isinstance(dim, (tuple, list)):
        return type(dim)(d + 1 if d >= 0 else d for d in dim)
    return dim + 1 if dim >= 0 else dim


def elementwise_rule(fn, args, kwargs, per_example):
    """Broadcasting ops. Ranks are right-aligned as in JAX's broadcast_batcher: a batched
    argument of lower rank than the result gets size-1 dims after its batch dim, so its
    batch dim never meets a shared tensor's leading dim."""
    ranks = []
    out_rank = 0
    for a, pe in zip(args, per_example):
        if pe is True:
            r = a.dim() - 1
            ranks.append(r)
            out_rank = max(out_rank, r)
        elif isinstance(a, Tensor):
            out_rank = max(out_rank, a.dim())
    for v in kwargs.values():
        if isinstance(v, Tensor):
            out_rank = max(out_rank, v.dim())
    if all(r == out_rank for r in ranks):
        return fn(*args, **kwargs)
    new = list(args)
    for i, (a, pe) in enumerate(zip(args, per_example)):
        if pe is True and a.dim() - 1 < out_rank:
            new[i] = a.reshape(a.shape[0], *([1] * (out_rank - a.dim() + 1)), *a.shape[1:])
    return fn(*new, **kwargs)


def _only_first_batched(per_example) -> bool:
    return per_example[0] is True and not any(per_example[1:])


def _get_arg(args, kwargs, pos, name, default=None):
    if len(args) > pos:
        return args[pos], True
    return kwargs.get(name, default), False


def _set_arg(args, kwargs, pos, name, value, positional):
    if positional:
        args = args[:pos] + (value,) + args[pos + 1:]
    else:
        kwargs = dict(kwargs)
        kwargs[name] = value
    return args, kwargs


def dim_rule(pos: int = 1, name: str = "dim", required: bool = False):
    """Ops whose only per-example argument is the first and which take a `dim` argument
    (softmax, cumsum, chunk, transpose's dims...): shift the dim."""
    def rule(fn, args, kwargs, per_example):
        return _dim_rule(pos, name, required, fn, args, kwargs, per_example)
    rule.dim_arg = (pos, name)      # what specialize.py needs to shift the dim once
    return rule


def _dim_rule(pos, name, required, fn, args, kwargs, per_example):
    if not _only_first_batched(per_example):
        return vmap_rule(fn, args, kwargs, per_example)
    dim, positional = _get_arg(args, kwargs, pos, name)
    if dim is None:
        if required or positional:
            return vmap_rule(fn, args, kwargs, per_example)
        return fn(*args, **kwargs)
    args, kwargs = _set_arg(args, kwargs, pos, name, _shift(dim), positional)
    return fn(*args, **kwargs)


def reduction_rule(fn, args, kwargs, per_example):
    """sum/mean/amax/... with `dim=` (shifted) or without (over all per-example dims)."""
    if len(args) > 1 and isinstance(args[1], Tensor):      # torch.max(a, b) is elementwise
        return elementwise_rule(fn, args, kwargs, per_example)
    if not _only_first_batched(per_example):
        return vmap_rule(fn, args, kwargs, per_example)
    dim, positional = _get_arg(args, kwargs, 1, "dim")
    if dim is not None and not isinstance(dim, str):
        args, kwargs = _set_arg(args, kwargs, 1, "dim", _shift(dim), positional)
        return fn(*args, **kwargs)
    if positional or kwargs.get("keepdim") or isinstance(dim, str):
        return vmap_rule(fn, args, kwargs, per_example)
    x = args[0]
    out = fn(x.reshape(x.shape[0], -1), *args[1:], dim=1, **kwargs)
    if fn in _VALUE_AND_INDEX:                  # max() -> tensor, max(dim) -> (values, idx)
        out = out[0]
    return out


def shape_rule(fn, args, kwargs, per_example):
    """reshape/view/expand take a target shape, either as varargs or one sequence."""
    if not _only_first_batched(per_example) or kwargs:
        return vmap_rule(fn, args, kwargs, per_example)
    x = args[0]
    shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    if fn in _EXPAND:
        return _expand(x, shape)
    return x.reshape(x.shape[0], *shape)


def _expand(x, shape):
    """Batched ``x.expand(*shape)``: new leading dims go after the batch dim, never
    against it."""
    n = x.shape[0]
    extra = len(shape) - (x.dim() - 1)
    if extra > 0:
        x = x.reshape(n, *([1] * extra), *x.shape[1:])
    return x.expand(n, *shape)


def like_rule(fn, args, kwargs, per_example):
    """view_as / reshape_as / expand_as: the target's shape is per-example when it is
    batched (then it is an elementwise-style op) and used as is when shared."""
    if per_example[1] is True or kwargs or per_example[0] is not True:
        return elementwise_rule(fn, args, kwargs, per_example)
    x, target = args
    if fn is Tensor.expand_as:
        return _expand(x, target.shape)
    return x.reshape(x.shape[0], *target.shape)


def permute_rule(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example) or kwargs:
        return vmap_rule(fn, args, kwargs, per_example)
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return args[0].permute(0, *_shift(tuple(dims)))


def transpose_rule(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example) or kwargs:
        return vmap_rule(fn, args, kwargs, per_example)
    x = args[0]
    if len(args) == 1:                           # t(): 0-d and 1-d are returned as is
        return x if x.dim() < 3 else x.transpose(1, 2)
    return fn(x, _shift(args[1]), _shift(args[2]))


def squeeze_rule(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example):
        return vmap_rule(fn, args, kwargs, per_example)
    x = args[0]
    dim, positional = _get_arg(args, kwargs, 1, "dim")
    if dim is None:   # only the per-example size-1 dims, never the batch dim (B may be 1)
        dims = tuple(i + 1 for i, s in enumerate(x.shape[1:]) if s == 1)
        return x.squeeze(dims) if dims else x
    return x.squeeze(_shift(dim))


def flatten_rule(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example):
        return vmap_rule(fn, args, kwargs, per_example)
    x = args[0]
    start, _ = _get_arg(args, kwargs, 1, "start_dim", 0)
    end, _ = _get_arg(args, kwargs, 2, "end_dim", -1)
    if x.dim() == 1:                             # flatten of a 0-d tensor gives shape (1,)
        return x.reshape(x.shape[0], 1)
    return x.flatten(_shift(start), _shift(end))


def cat_rule(fn, args, kwargs, per_example):
    """torch.cat / torch.stack: shared members are expanded along the batch dim."""
    tensors = args[0]
    flags = per_example[0]
    if type(flags) is not tuple or any(per_example[1:]):
        return vmap_rule(fn, args, kwargs, per_example)
    dim, positional = _get_arg(args, kwargs, 1, "dim", 0)
    if not all(flags):
        n = next(t.shape[0] for t, f in zip(tensors, flags) if f)
        tensors = [t if f else t.expand(n, *t.shape) for t, f in zip(tensors, flags)]
    if positional:
        return fn(tensors, _shift(dim), *args[2:], **kwargs)
    kwargs = dict(kwargs)
    kwargs["dim"] = _shift(dim)
    return fn(tensors, *args[2:], **kwargs)


def split_rule(fn, args, kwargs, per_example):
    """chunk(x, n, dim) / split(x, size, dim): the dim is the third argument."""
    if not _only_first_batched(per_example):
        return vmap_rule(fn, args, kwargs, per_example)
    dim, positional = _get_arg(args, kwargs, 2, "dim", 0)
    args, kwargs = _set_arg(args, kwargs, 2, "dim", _shift(dim), positional)
    return fn(*args, **kwargs)


def unbind_rule(fn, args, kwargs, per_example):
    if not _only_first_batched(per_example):
        return vmap_rule(fn, args, kwargs, per_example)
    dim, positional = _get_arg(args, kwargs, 1, "dim", 0)
    args, kwargs = _set_arg(args, kwargs, 1, "dim", _shift(dim), positional)
    return fn(*args, **kwargs)


def _is_advanced(i) -> bool:
    return isinstance(i, (Tensor, list)) or (isinstance(i, bool))


def getitem_rule(fn, args, kwargs, per_example):
    """x[idx]. With x batched and a shared index: prepend a full slice. With a shared table
    and a per-example index tensor as the whole index: index the table with the batch of
    indices. With both per-example: pair each row with its own indices."""
    x, index = args
    flags = per_example[1]
    items = index if type(index) is tuple else (index,)
    if per_example[0] is True and not flags:
        if sum(1 for i in items if _is_advanced(i)) > 1:
            return vmap_rule(fn, args, kwargs, per_example)
        return x[(slice(None),) + items]
    if per_example[0] is False and flags is True:
        return x[index]
    if per_example[0] is True and flags is True:
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows.view(-1, *([1] * (index.dim() - 1))), index]
    return vmap_rule(fn, args, kwargs, per_example)


def matmul_rule(fn, args, kwargs, per_example):
    a, b = args[0], args[1]
    pa, pb = per_example[0], per_example[1]
    if kwargs:
        return vmap_rule(fn, args, kwargs, per_example)
    if pa is True and pb is False:
        if b.dim() <= 2:
            return torch.matmul(a, b)
    elif pa is False and pb is True:
        rb = b.dim() - 1
        if a.dim() == 2 and rb == 1:
            return torch.matmul(b, a.t())
        if a.dim() == 1 and rb == 1:
            return torch.matmul(b, a)
        if a.dim() <= 2 and rb >= 2:
            return torch.matmul(a, b)
    elif pa is True and pb is True:
        ra, rb = a.dim() - 1, b.dim() - 1
        if ra == rb == 1:
            return (a * b).sum(-1)
        if ra >= 2 and ra == rb:
            return torch.matmul(a, b)
        if ra == 2 and rb == 1:
            return torch.matmul(a, b.unsqueeze(-1)).squeeze(-1)
        if ra == 1 and rb == 2:
            return torch.matmul(a.unsqueeze(1), b).squeeze(1)
    return vmap_rule(fn, args, kwargs, per_example)


def first_arg_rule(fn, args, kwargs, per_example):
    """Ops that act on trailing dims and take only shared extras (linear, embedding's
    indices, layer_norm, pad): the batched call is the plain call."""
    if not _only_first_batched(per_example):
        return vmap_rule(fn, args, kwargs, per_example)
    return fn(*args, **kwargs)


def cross_entropy_rule(fn, args, kwargs, per_example):
    """F.cross_entropy / F.nll_loss for one example with 1-d logits [C] and a 0-d target:
    batched, logits [B, C] and targets [B] with reduction='none'. 'mean' over one example
    divides by that example's class weight (or is nan when the target is ignored), as
    PyTorch does."""
    if len(args) != 2 or per_example[0] is not True or args[0].dim() != 2 or \
            args[1].dtype.is_floating_point:
        return vmap_rule(fn, args, kwargs, per_example)
    if per_example[1] is not True:         # one shared target for every example
        if args[1].dim() != 0:
            return vmap_rule(fn, args, kwargs, per_example)
        args = (args[0], args[1].expand(args[0].shape[0]))
    elif args[1].dim() != 1:
        return vmap_rule(fn, args, kwargs, per_example)
    kw = dict(kwargs)
    for deprecated in ("size_average", "reduce"):
        if kw.get(deprecated) is not None:
            return vmap_rule(fn, args, kwargs, per_example)
    reduction = kw.pop("reduction", "mean")
    if kw.get("label_smoothing") and kw.get("weight") is not None:
        return vmap_rule(fn, args, kwargs, per_example)
    loss = fn(args[0], args[1], reduction="none", **kw)
    if reduction == "mean":
        ignore = kw.get("ignore_index", -100)
        weight = kw.get("weight")
        target = args[1]
        keep = target != ignore
        denom = keep.to(loss.dtype)
        if weight is not None:
            denom = denom * weight[target.clamp(0, weight.shape[0] - 1)]
        loss = loss / denom
    elif reduction != "none" and reduction != "sum":
        return vmap_rule(fn, args, kwargs, per_example)
    return loss


def native_module_rule(module, args, kwargs, per_example):
    """Built-in blocks (nn.Linear, nn.Embedding, nn.LayerNorm, RNN cells) batch natively:
    their batched form is the module itself on the stacked inputs. RNN cells accept one
    example as 1-d input and a batch as 2-d, so only 1-d per-example inputs qualify."""
    if isinstance(module, torch.nn.RNNCellBase):
        x = args[0]
        if per_example[0] is not True or x.dim() != 2:
            return vmap_rule(module, args, kwargs, per_example)
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if hx is not None:
            flags = per_example[1] if len(args) > 1 else (True,)
            if isinstance(hx, (tuple, list)):
                if type(flags) is not tuple or not all(flags):
                    n = x.shape[0]
                    f = flags if type(flags) is tuple else (flags,) * len(hx)
                    hx = type(hx)(h if fl else h.expand(n, *h.shape) for h, fl in zip(hx, f))
                    args = (x, hx) + args[2:]
            elif flags is not True:
                args = (x, hx.expand(x.shape[0], *hx.shape)) + args[2:]
        return module(*args, **kwargs)
    if not _only_first_batched(per_example):
        return vmap_rule(module, args, kwargs, per_example)
    return module(*args, **kwargs)


# -- the table -----------------------------------------------------------------------------
_T = Tensor
_VALUE_AND_INDEX = {torch.max, torch.min, _T.max, _T.min, torch.median, _T.median}
_EXPAND = {_T.expand}

_UNARY = [
    "abs", "neg", "negative", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt",
    "rsqrt", "sin", "cos", "tan", "sinh", "cosh", "asin", "acos", "atan", "tanh", "sigmoid",
    "relu", "sign", "floor", "ceil", "round", "trunc", "frac", "reciprocal", "square", "erf",
    "erfc", "logit", "clone", "detach", "contiguous", "float", "double", "half", "long", "int",
    "bool", "to", "type_as", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
    "randn_like", "clamp", "clip", "clamp_min", "clamp_max", "nan_to_num", "logical_not",
    "isnan", "isinf", "isfinite", "bitwise_not", "positive", "cpu", "cuda", "hardshrink",
    "sgn", "deg2rad", "rad2deg", "angle",
]
_BINARY = [
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide",
    "floor_divide", "remainder", "fmod", "pow", "float_power", "maximum", "minimum", "fmax",
    "fmin", "atan2", "eq", "ne", "lt", "le", "gt", "ge", "greater", "less", "logical_and",
    "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "where",
    "masked_fill", "lerp", "addcmul", "addcdiv", "hypot", "copysign", "rsub", "xlogy",
    "heaviside",
]
_OPERATORS = [
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__",
    "__rpow__", "__neg__", "__pos__", "__abs__", "__invert__", "__and__", "__rand__", "__or__",
    "__ror__", "__xor__", "__rxor__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__lshift__", "__rshift__",
]
_F_ELEMENTWISE = [
    "relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "leaky_relu", "softplus",
    "softsign", "hardtanh", "hardsigmoid", "hardswish", "logsigmoid", "tanhshrink",
    "softshrink", "hardshrink", "threshold", "dropout", "alpha_dropout", "sigmoid", "tanh",
    "rrelu",
]
_REDUCTIONS = [
    "sum", "mean", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "logsumexp",
    "norm", "std", "var", "all", "any", "count_nonzero", "nansum", "nanmean", "median",
]
_DIM_OPS = [  # (name, position of dim, name of dim)
    ("softmax", 1, "dim"), ("log_softmax", 1, "dim"), ("cumsum", 1, "dim"),
    ("cumprod", 1, "dim"), ("cummax", 1, "dim"), ("cummin", 1, "dim"), ("unsqueeze", 1, "dim"),
    ("argsort", 1, "dim"), ("sort", 1, "dim"), ("flip", 1, "dims"),
    ("narrow", 1, "dim"), ("select", 1, "dim"), ("index_select", 1, "dim"),
    ("gather", 1, "dim"), ("diff", 2, "dim"),
]


def _fns(name):
    return [getattr(torch, name, None), getattr(Tensor, name, None)]


for _n in _UNARY + _BINARY:
    register(elementwise_rule, *{f for f in _fns(_n) if f is not None} - set(RULES))
for _n in _OPERATORS:
    register(elementwise_rule, getattr(Tensor, _n))
for _n in _F_ELEMENTWISE:
    _f = getattr(F, _n, None)
    if _f is not None and _f not in RULES:
        register(elementwise_rule, _f)
for _n in _REDUCTIONS:
    register(reduction_rule, *{f for f in _fns(_n) if f is not None} - set(RULES))
for _n, _pos, _kw in _DIM_OPS:
    register(dim_rule(_pos, _kw, required=_n in ("softmax", "log_softmax")),
             *{f for f in _fns(_n) if f is not None} - set(RULES))
register(dim_rule(1, "dim", required=True), F.softmax, F.log_softmax, F.softmin)
register(dim_rule(2, "dim"), F.normalize)
register(dim_rule(2, "dim"), torch.topk, Tensor.topk, torch.roll, Tensor.roll)
register(shape_rule, Tensor.reshape, Tensor.view, torch.reshape, Tensor.expand)
register(permute_rule, Tensor.permute, torch.permute)
register(like_rule, Tensor.expand_as, Tensor.view_as, Tensor.reshape_as)
register(transpose_rule, Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes,
         Tensor.swapdims, torch.swapdims, Tensor.t, torch.t)
register(squeeze_rule, Tensor.squeeze, torch.squeeze)
register(flatten_rule, Tensor.flatten, torch.flatten)
register(cat_rule, torch.cat, torch.concat, torch.concatenate, torch.stack)
register(split_rule, torch.chunk, Tensor.chunk, torch.split, Tensor.split)
register(unbind_rule, torch.unbind, Tensor.unbind)
register(getitem_rule, Tensor.__getitem__)
register(matmul_rule, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm,
         torch.mv, Tensor.mv)
register(first_arg_rule, F.linear, F.embedding, F.layer_norm, F.pad, F.rms_norm
         if hasattr(F, "rms_norm") else None)
register(cross_entropy_rule, F.cross_entropy, F.nll_loss)
del _n, _f, _pos, _kw
