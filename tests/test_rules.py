"""Batching rules against their semantics (STYLE.md section 5).

A case is one call as per-example code writes it, ``P`` marking its per-example arguments
(one tensor per example); other tensors are shared. The case takes the engine's way to a
batched call (signature.py: an ``Input`` marker template, ``normalize.normalize`` and
``canonical``, ``rules.rule_for(key)``, ``rule(Call)``); the rule must not decline, and its
batched call on the stacked inputs must equal both ``torch.func.vmap`` of the canonical
target (what batching means) and the stack of eager per-example calls as written
(functorch's loop): same structure, shapes and dtypes, ints exact, float64 within 1e-10.
``DECLINED`` calls must make their rule decline and still match eager through
``db.batched``. Every RULES key must be reached by a form of tests/opspecs.py or a case
here, every rule function by a case here, and the reference models must run with no
fallback. Known gaps are strict xfails (``GAPS``, ``UNCOVERED``).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves

import dynbatch as db
from dynbatch import rules
from dynbatch.lazy import Input, meta_of_tensor
from dynbatch.models import BiLSTMTagger, BinaryTreeLSTM, ChildSumTreeLSTM
from dynbatch.rules import Call, fallback, normalize
from dynbatch.rules.fused import SegmentSum, stacked_sum
from dynbatch.signature import name_of
from dynbatch.testing import assert_matches_eager, strict

T, F64, G = torch.Tensor, torch.float64, torch.Tensor.__getitem__
# ``x[i] = v`` is recorded out of place as this function (trace.py)
setitem = next(k for k in rules.RULES if getattr(k, "__name__", "") == "setitem")
# functorch's own note on the reference vmap of isclose, not the engine's doing
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
B = 3                       # examples per case
ATOL = RTOL = 1e-10
_gen = torch.Generator().manual_seed(0)


class P:
    """A per-example argument: one tensor per example (stacked on dim 0 for the rule)."""

    def __init__(self, values):
        self.values = values


def p(*shape, draw=torch.randn):
    return P([draw(shape, generator=_gen, dtype=F64) for _ in range(B)])


def unit(*shape):           # in (0.1, 0.9): inside every unary op's domain
    return P([x * 0.8 + 0.1 for x in p(*shape, draw=torch.rand).values])


def pint(high, *shape):
    return P([torch.randint(high, shape, generator=_gen) for _ in range(B)])


def pbool(*shape):
    return P([x > 0.5 for x in p(*shape, draw=torch.rand).values])


def s(*shape):
    return torch.randn(shape, generator=_gen, dtype=F64)


def sint(high, *shape):
    return torch.randint(high, shape, generator=_gen)


# Known gaps (strict xfails: fixing one fails its entry). The engine is right, but through
# vmap, since the rule is never reached or its batched call fails (the engine's fake-batch
# check catches that); or the rule warns where eager code does not.
GAPS: dict[str, str] = {}
CASES, DECLINED = [], []


def case(id, fn, *args, **kwargs):
    marks = [pytest.mark.xfail(strict=True, reason=GAPS[id])] if id in GAPS else []
    CASES.append(pytest.param(fn, args, kwargs, id=id, marks=marks))


def declined(id, fn, *args, **kwargs):
    DECLINED.append(pytest.param(fn, args, kwargs, id=id))


# -- elementwise: every registered torch / F function, operators, broadcasting, 0-d --------
_UNARY = """abs neg exp exp2 expm1 log log1p log2 log10 sqrt rsqrt sin cos tan sinh cosh asin
acos atan tanh sigmoid relu sign sgn floor ceil round trunc frac reciprocal square erf erfc
erfinv logit nan_to_num logical_not isnan isinf isfinite positive deg2rad rad2deg angle
hardshrink lgamma digamma i0 sinc negative"""
_BINARY = """add sub subtract mul multiply div divide true_divide floor_divide remainder fmod
pow float_power maximum minimum fmax fmin atan2 arctan2 eq ne lt le gt ge greater less
greater_equal less_equal not_equal logical_and logical_or logical_xor hypot copysign rsub
xlogy heaviside nextafter isclose clamp_min clamp_max"""
_BITWISE = "bitwise_and bitwise_or bitwise_xor bitwise_left_shift bitwise_right_shift"
_F = """relu6 elu selu celu gelu silu mish logsigmoid softsign hardsigmoid hardswish tanhshrink
softshrink sigmoid tanh softplus hardtanh relu"""
for _n in _UNARY.split():
    case(f"torch.{_n}", getattr(torch, _n), unit(2, 3))
for _n in _BINARY.split():
    case(f"torch.{_n}", getattr(torch, _n), unit(2, 3), s(3).abs() + 0.5)
for _n in _BITWISE.split():
    case(f"torch.{_n}", getattr(torch, _n), pint(8, 4), sint(3, 4))
for _n in _F.split():
    case(f"F.{_n}", getattr(F, _n), p(2, 3))
for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "eq", "ne", "lt", "le", "gt", "ge"):
    case(f"x.__{_n}__(shared)", getattr(T, f"__{_n}__"), unit(4), s(2, 4).abs() + 0.5)
for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
    case(f"x.__r{_n}__(2.0)", getattr(T, f"__r{_n}__"), unit(4), 2.0)
for _n in ("and", "or", "xor", "lshift", "rshift", "rand", "ror", "rxor"):
    case(f"x.__{_n}__(int)", getattr(T, f"__{_n}__"), pint(8, 4), sint(3, 4))
case("x ** shared", T.__pow__, unit(4), s(4))
case("~x", T.__invert__, pbool(4))
case("torch.bitwise_not", torch.bitwise_not, pint(8, 4))
case("-x", T.__neg__, p(4))
case("F.threshold", F.threshold, p(4), 0.1, 20.0)
case("F.leaky_relu-kw", F.leaky_relu, p(4), negative_slope=0.3)
case("0-d", torch.tanh, p())
case("0-d * per-example", torch.mul, p(), p(3, 4))
case("0-d * shared matrix", torch.mul, p(), s(3, 4))
case("ranks differ", T.__mul__, p(4), p(3, 4))
case("shared first, higher rank", torch.add, s(2, 3, 4), p(4))
case("add-alpha-kw", torch.add, p(4), p(4), alpha=2.5)
case("add-other-kw", torch.add, p(4), other=s(4))
case("where", torch.where, pbool(4), p(4), 0.0)
case("where-0d-cond", torch.where, pbool(), p(4), s(3, 4))
case("x.where(c, y)", T.where, p(4), pbool(4), s(4))
case("clamp-kw", torch.clamp, p(4), min=-0.5, max=0.5)
case("clip-pos", torch.clip, p(4), -0.5, 0.5)
case("masked_fill", torch.masked_fill, p(2, 3), pbool(3), 0.0)
case("lerp", torch.lerp, p(4), s(4), 0.3)
case("addcmul-kw", torch.addcmul, p(4), p(4), s(4), value=0.5)
case("addcdiv", torch.addcdiv, p(4), s(4), unit(4))

# -- first-argument ops, pad, type_as, new_* -----------------------------------------------
_CONVERSIONS = "float double half bfloat16 long int short char byte bool cpu contiguous"
for _n in _CONVERSIONS.split():
    case(f"x.{_n}()", getattr(T, _n), p(2, 3))
for _n in ("clone", "detach", "zeros_like", "ones_like"):
    case(f"torch.{_n}", getattr(torch, _n), p(2, 3))
case("x.float() of 0-d int", T.float, pint(5))
case("x.to(dtype)", T.to, pint(5, 3), torch.float32)
case("full_like", torch.full_like, p(2, 3), 7.0)
case("tril-neg-diagonal-kw", torch.tril, p(3, 3), diagonal=-1)
case("triu", torch.triu, p(3, 4), 1)
case("F.linear", F.linear, p(2, 3), s(4, 3), s(4))
case("F.linear-bias-kw", F.linear, p(3), s(4, 3), bias=s(4))
case("F.embedding-0d", F.embedding, pint(9), s(9, 4))
case("F.embedding-padding-kw", F.embedding, pint(9, 5), s(9, 4), padding_idx=0)
case("F.layer_norm", F.layer_norm, p(3, 5), (5,), s(5), s(5))
case("F.rms_norm", F.rms_norm, p(3, 5), [5], s(5), eps=1e-3)
case("F.dropout-p0", F.dropout, p(4), 0.0)
case("torch.dropout-eval", torch.dropout, p(4), 0.5, False)
case("F.alpha_dropout-eval", F.alpha_dropout, p(4), 0.5)
case("F.pad", F.pad, p(2, 3), (1, 2))
case("F.pad-value-kw", F.pad, p(2, 3), (1, 1, 2, 0), value=2.0)
case("type_as-shared", T.type_as, pint(5, 4), s(4))
case("type_as-per-example", T.type_as, p(4), pint(5, 2))
case("new_zeros-tuple", T.new_zeros, p(4), (2, 3))
case("new_ones-varargs", T.new_ones, pint(5, 4), 2, 3)

# -- dim ops: positional, keyword, alias, negative dims ------------------------------------
_DIM_OPS = "cumsum cumprod cummax cummin logcumsumexp argsort softmax log_softmax"
for _n in _DIM_OPS.split():
    case(f"{_n}-neg", getattr(torch, _n), p(3, 4), -1)
case("F.softmax-kw", F.softmax, p(3, 5), dim=0)
case("x.log_softmax-kw", T.log_softmax, p(5), dim=0)
case("F.log_softmax", F.log_softmax, p(3, 5), 1)
case("F.softmin", F.softmin, p(3, 5), 1)
case("F.glu", F.glu, p(3, 4), -1)
case("F.normalize-kw", F.normalize, p(3, 4), dim=0)
case("sort-kw", torch.sort, p(3, 4), dim=0, descending=True)
case("topk", T.topk, p(5), 2)
case("narrow", torch.narrow, p(4, 5), -1, 1, 2)
case("select", T.select, p(3, 4), 0, 1)
case("chunk", torch.chunk, p(6), 3)
case("split-neg", T.split, p(2, 6), 3, -1)
case("split-sections-kw", torch.split, p(2, 5), [1, 4], dim=1)
case("unbind", torch.unbind, p(3, 2), 1)
case("flip-kw", torch.flip, p(2, 3), dims=(0, -1))
case("x.flip-varargs", T.flip, p(2, 3), 1)
case("roll", torch.roll, p(4, 2), 1, 0)
case("transpose-neg", torch.transpose, p(2, 3, 4), -1, -3)
case("swapdims", torch.swapdims, p(2, 3), 0, 1)
case("swapaxes", torch.swapaxes, p(2, 3), 1, 0)
case("movedim", torch.movedim, p(2, 3, 4), 0, -1)
case("moveaxis-tuple", torch.moveaxis, p(2, 3, 4), (0, 1), (2, 0))
case("diagonal", torch.diagonal, p(3, 3))
case("unflatten", torch.unflatten, p(6), 0, (2, 3))
case("index_select-shared-index", torch.index_select, p(3, 4), 1, sint(4, 2))
case("gather-per-example-index", torch.gather, p(3, 4), 1, pint(4, 3, 2))
case("diff-n2", torch.diff, p(5), 2)
case("diff-shared-prepend", torch.diff, p(5), prepend=s(1))
case("t-2d", torch.t, p(2, 3))
case("x.t-1d", T.t, p(3))
case("permute-varargs", T.permute, p(2, 3, 4), 2, 0, 1)
case("permute-tuple-neg", torch.permute, p(2, 3, 4), (-1, 0, 1))

# -- shape ops -----------------------------------------------------------------------------
case("view-varargs", T.view, p(6), 2, 3)
case("reshape-minus-one", torch.reshape, p(2, 3), (-1,))
case("reshape-to-0d", T.reshape, p(1), ())
case("flatten-0d", torch.flatten, p())
case("flatten-start", T.flatten, p(2, 3, 4), 1)
case("squeeze-dim", torch.squeeze, p(1, 3, 1), 2)
case("unsqueeze-kw", T.unsqueeze, p(3), dim=0)
case("unsqueeze-0d", torch.unsqueeze, p(), -1)
case("ravel", torch.ravel, p(2, 3))
case("view_as-shared", T.view_as, p(6), s(2, 3))
case("reshape_as-per-example", T.reshape_as, p(6), p(3, 2))
case("expand-new-leading", T.expand, p(4), 2, 4)
case("expand-leading-equals-batch", T.expand, p(4), B, 4)
case("expand-minus-one", T.expand, p(1, 4), (3, -1))
case("expand_as-per-example", T.expand_as, p(1, 4), p(3, 4))
case("broadcast_to", torch.broadcast_to, p(4), (2, 4))
case("repeat-extra-dims", T.repeat, p(2), 3, 2)
case("repeat-tuple", T.repeat, p(2, 3), (1, 2))

# -- reductions ----------------------------------------------------------------------------
_REDUCTIONS = """sum mean prod amax amin max min argmax argmin std var norm median nansum
nanmean nanmedian"""
for _n in _REDUCTIONS.split():
    case(f"{_n}-all", getattr(torch, _n), p(3, 4))
    case(f"{_n}-dim-neg", getattr(T, _n), p(3, 4), -1)
case("logsumexp-kw", torch.logsumexp, p(3, 4), dim=0, keepdim=True)
case("sum-dim-tuple-neg", T.sum, p(2, 3, 4), (-1, 0))
case("sum-dtype-kw", torch.sum, pint(5, 3), dtype=F64)
case("mean-0d", torch.mean, p())
case("amax-dim-list-keepdim", torch.amax, p(2, 3, 4), [0, 2], True)
case("var-correction-kw", torch.var, p(3, 4), 1, correction=0)
case("norm-p1-kw", torch.norm, p(3, 4), p=1, dim=-1)
case("vector_norm", torch.linalg.vector_norm, p(3, 4), ord=3, dim=(0, 1))
case("all", torch.all, pbool(3, 4))
case("any-dim", torch.any, pbool(3, 4), 1)
case("count_nonzero", torch.count_nonzero, pint(3, 3, 4), dim=0)
case("max-elementwise", torch.max, p(3, 4), s(4))

# -- joins, indexing, matmul ---------------------------------------------------------------
case("cat-mixed-shared", torch.cat, [p(3), s(2), p(1)])
case("cat-neg-dim", torch.cat, (p(2, 3), s(2, 2)), -1)
case("concat-kw", torch.concat, [s(1, 3), p(2, 3)], dim=0)
case("concatenate-axis", torch.concatenate, [p(2, 3), p(2, 1)], axis=1)
case("stack-mixed-neg", torch.stack, [p(2, 3), s(2, 3)], dim=-1)
case("stack-dim1", torch.stack, [p(3), p(3)], 1)
case("x[-1]", G, p(4, 3), -1)
case("x[1:3, None, 2]", G, p(4, 3), (slice(1, 3), None, 2))
case("x[..., 1]", G, p(2, 3, 4), (Ellipsis, 1))
case("x[shared index]", G, p(5, 2), torch.tensor([4, 0, 0]))
case("x[:, [0, 2]]", G, p(3, 4), (slice(None), [0, 2]))
case("table[per-example ids]", G, s(7, 3), pint(7, 4))
case("x[per-example ids]", G, p(5, 3), pint(5, 2))
case("aten.index 0-d", torch.ops.aten.index.Tensor, s(7, 3), [pint(7)])
case("aten.index two 0-d", torch.ops.aten.index.Tensor, s(7, 5), [pint(7), pint(5)])
for _id, _a, _b in [("p1@s2", p(3), s(3, 4)), ("p2@s1", p(2, 3), s(3)),
                    ("p3@s2", p(2, 2, 3), s(3, 4)), ("s2@p1", s(4, 3), p(3)),
                    ("s1@p1", s(3), p(3)), ("s2@p3", s(2, 3), p(5, 3, 4)),
                    ("p1@p1", p(3), p(3)), ("p2@p2", p(2, 3), p(3, 4)),
                    ("p2@p1", p(2, 3), p(3)), ("p1@p2", p(3), p(3, 4))]:
    case(f"matmul-{_id}", torch.matmul, _a, _b)
case("x @ W", T.__matmul__, p(2, 3), s(3, 4))
case("mm-shared-first", torch.mm, s(2, 3), p(3, 4))
case("mv", torch.mv, p(2, 3), p(3))
case("dot", torch.dot, p(3), s(3))

# -- losses and item assignment ------------------------------------------------------------
_Y = P([torch.tensor(2), torch.tensor(0), torch.tensor(3)])
for _red in ("mean", "sum", "none"):
    case(f"cross_entropy-{_red}", F.cross_entropy, p(4), _Y, reduction=_red)
    case(f"cross_entropy-{_red}-weight-ignore", F.cross_entropy, p(4), _Y,
         weight=s(4).abs() + 0.1, ignore_index=0, reduction=_red)     # examples[1]: nan
    case(f"cross_entropy-rows-{_red}", F.cross_entropy, p(2, 4), pint(4, 2), reduction=_red)
case("cross_entropy-shared-target", F.cross_entropy, p(2, 4), sint(4, 2))
case("cross_entropy-label-smoothing", F.cross_entropy, p(4), _Y, label_smoothing=0.1)
case("nll_loss-all-kw", F.nll_loss, input=p(4), target=_Y, weight=s(4).abs())
case("mse_loss", F.mse_loss, p(3), p(3))
case("l1_loss", F.l1_loss, p(2, 3), p(2, 3))
case("l1_loss-shared-sum", F.l1_loss, p(2, 3), s(2, 3), reduction="sum")
case("smooth_l1_loss-beta", F.smooth_l1_loss, p(3), p(3), beta=0.5)
case("huber_loss-none", F.huber_loss, p(3), p(3), reduction="none", delta=0.5)
case("x[1] = 0.0", setitem, p(4, 3), 1, 0.0)
case("x[:, 0] = v", setitem, p(4, 3), (slice(None), 0), p(4))
case("x[1:3] = v", setitem, p(5), slice(1, 3), p(2))
case("x[..., 1] = 0-d v", setitem, p(2, 3), (Ellipsis, 1), p())
case("x[shared index] = shared", setitem, p(5), torch.tensor([0, 3]), s(2))

# -- calls the rule must decline (vmap runs them) ------------------------------------------
declined("softmax of 0-d", torch.softmax, p(), 0)
declined("sum of 0-d over dim 0", torch.sum, p(), 0)
declined("roll without dims", torch.roll, p(2, 3), 1)
declined("F.linear per-example weight", F.linear, p(3), p(4, 3))
declined("F.pad reflect", F.pad, p(2, 3), (1, 1), mode="reflect")
declined("two advanced indices", G, p(4, 3), (torch.tensor([0, 1]), torch.tensor([2, 0])))
declined("matmul ranks 3 @ 2 per-example", torch.matmul, p(2, 2, 3), p(3, 4))
declined("cross_entropy soft targets", F.cross_entropy, p(4), unit(4))
declined("index_select per-example index", torch.index_select, p(3, 4), 1, pint(4, 2))
declined("x[per-example index] = v", setitem, p(5), pint(5, 2), 0.0)
declined("norm nuc", torch.norm, p(3, 3), "nuc")


# -- the machinery -------------------------------------------------------------------------

def _map(a, cls, f):
    """``a`` with every ``cls`` instance replaced by ``f(it)``, in lists, tuples and dicts."""
    if isinstance(a, cls):
        return f(a)
    if type(a) in (list, tuple):
        return type(a)(_map(x, cls, f) for x in a)
    if type(a) is dict:
        return {k: _map(v, cls, f) for k, v in a.items()}
    return a


def per_examples(args, kwargs) -> list[P]:
    found = []
    _map((args, kwargs), P, found.append)
    return found


def call_with(fn, args, kwargs, values):
    """``fn`` with ``values[k]`` in place of the call's k-th ``P``; a Tensor method is
    called as a method of its first argument, as per-example code writes it."""
    k = iter(values)
    args, kwargs = _map((args, kwargs), P, lambda _: next(k))
    name = getattr(fn, "__name__", "")
    if args and getattr(T, name, None) is fn:
        return getattr(args[0], name)(*args[1:], **kwargs)
    return fn(*args, **kwargs)


@dataclass
class Prepared:
    normal: normalize.Normal    # canonical target and rule key
    canon: dict                 # canonical kwargs, an Input marker per per-example tensor
    batched: object             # what the rule made of the Call; None: it declined
    values: list                # value k: the stacked tensors of the k-th P

    def fill(self, values):
        return (), _map(self.canon, Input, lambda m: values[m.k])


def prepare(fn, args, kwargs) -> Prepared:
    """The engine's way from a recorded call to a rule's batched call (signature.py)."""
    xs = per_examples(args, kwargs)
    markers = iter(Input(k, meta_of_tensor(x.values[0])) for k, x in enumerate(xs))
    targs, tkwargs = _map((args, kwargs), P, lambda _: next(markers))
    normal = normalize.normalize(fn, targs, tkwargs)
    assert normal is not None, f"{name_of(fn)}: no schema binds the call"
    canon = normalize.canonical(normal, targs, tkwargs)
    rule = rules.rule_for(normal.key)
    assert rule is not None, f"{name_of(normal.key)}: no rule"
    outputs = tuple(map(meta_of_tensor, tree_leaves(
        call_with(fn, args, kwargs, [x.values[0] for x in xs]))))
    return Prepared(normal, canon, rule(Call(fn, normal.target, canon, outputs)),
                    [torch.stack(x.values) for x in xs])


def assert_same(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} outputs vs {len(want)}"
    for k, (a, e) in enumerate(zip(got, want)):
        assert (a.shape, a.dtype) == (e.shape, e.dtype), \
            f"{what}[{k}]: {tuple(a.shape)} {a.dtype} vs {tuple(e.shape)} {e.dtype}"
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL, equal_nan=True,
                                       msg=lambda m, k=k: f"{what}[{k}]: {m}")
        else:
            assert torch.equal(a, e), f"{what}[{k}]: {a} vs {e}"


def warned(f):
    """(``f()``, the messages of the warnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        return f(), [str(w.message) for w in caught]


@pytest.mark.parametrize("fn, args, kwargs", CASES)
def test_rule_matches_vmap_and_loop(fn, args, kwargs):
    prep = prepare(fn, args, kwargs)
    assert prep.batched is not None, f"the rule for {name_of(prep.normal.key)} declined"
    out, rule_warnings = warned(lambda: prep.batched(prep.fill(prep.values)[1]))
    xs = per_examples(args, kwargs)
    rows, eager_warnings = warned(lambda: [tree_flatten(call_with(
        fn, args, kwargs, [x.values[i] for x in xs])) for i in range(B)])
    assert tree_flatten(out)[1] == rows[0][1], "the rule returns another structure than eager"
    loop = [torch.stack(column) for column in zip(*(leaves for leaves, _ in rows))]
    assert_same(tree_leaves(out), loop, "rule vs loop")
    assert_same(tree_leaves(out), tree_leaves(
        fallback.vmap_call(prep.normal.target, prep.fill, prep.values)), "rule vs vmap")
    assert eager_warnings or not rule_warnings, f"only the rule warns: {rule_warnings[0]}"


@pytest.mark.parametrize("fn, args, kwargs", DECLINED)
def test_declined_call_matches_eager_through_vmap(fn, args, kwargs):
    assert prepare(fn, args, kwargs).batched is None, "the rule did not decline"
    xs = per_examples(args, kwargs)
    with strict():
        assert_matches_eager(lambda ex: call_with(fn, args, kwargs, ex),
                             [tuple(x.values[i] for x in xs) for i in range(B)],
                             atol=ATOL, rtol=RTOL)
    assert db.stats().vmap_batches >= 1 and db.stats().fallbacks == 0, db.stats()


# -- fused stacked sums (rules/fused.py) ---------------------------------------------------

@pytest.mark.parametrize("all_dims", [True, False], ids=["sum()", "sum(0)"])
@pytest.mark.parametrize("lengths", [(1, 3, 2), (2, 2, 2)], ids=["ragged", "equal"])
def test_segment_sum_matches_loop_and_vmap(all_dims, lengths):
    members = [[s(2, 3) for _ in range(n)] for n in lengths]
    rows = torch.stack([x for xs in members for x in xs])
    segments = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    (got,) = SegmentSum(all_dims).batched((rows, segments, len(lengths)))
    eager = [torch.stack(xs).sum() if all_dims else torch.stack(xs).sum(0) for xs in members]
    assert_same([got], [torch.stack(eager)], "segment sum vs loop")
    if len(set(lengths)) == 1:
        by_position = [torch.stack(column) for column in zip(*members)]
        vmapped = torch.func.vmap(lambda *xs: stacked_sum(list(xs), all_dims))(*by_position)
        assert_same([got], [vmapped], "segment sum vs vmap")


def test_stacked_sums_of_ragged_stacks_are_one_batch_each():
    examples = [[s(4) for _ in range(n)] for n in (1, 4, 2, 3)]
    with strict():
        assert_matches_eager(lambda xs: (torch.stack(xs).sum(), torch.stack(xs).sum(0)),
                             examples, atol=ATOL, rtol=RTOL)
    stats = db.stats()
    assert (stats.batches, stats.vmap_batches, stats.fallbacks) == (2, 0, 0), stats


# -- coverage of the table -----------------------------------------------------------------

class _Keys(TorchFunctionMode):
    """The rule keys of the calls on per-example tensors (those not in ``shared``). A mode
    sees operators as their methods (``x + y`` as ``Tensor.add``) and ``x[i] = v`` as
    ``__setitem__``, so those keys count from this file's cases only."""

    def __init__(self, shared):
        super().__init__()
        self.shared, self.keys = shared, set()

    def __torch_function__(self, fn, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(t, T) and id(t) not in self.shared
               for t in tree_leaves((args, kwargs))):
            normal = normalize.normalize(fn, args, kwargs)
            if normal is not None:          # an unnormalized call reaches no rule
                self.keys.add(normal.key)
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def case_keys() -> set:
    """The rule keys this file's cases reach, known gaps left out."""
    return {prepare(*c.values).normal.key for c in CASES + DECLINED if not c.marks}


@pytest.fixture(scope="module")
def covered_keys(case_keys) -> set:
    """The rule keys reached by this file's cases or by a form of tests/opspecs.py, each
    form run once eagerly on the inputs the fuzzer draws for it."""
    import opspecs
    from test_fuzz_forms import Seeded, build_case
    keys = set(case_keys)
    for o, mn, form in opspecs.all_forms():
        dtypes, (lo, hi) = opspecs.dtypes_of(o, mn), opspecs.rank_range(o, mn)
        c = build_case(o, mn, F64 if F64 in dtypes else dtypes[0], Seeded(0), n_examples=1,
                       grads="none", rank=min(hi, max(lo, 1)))
        mode = _Keys({id(v) for v in vars(c.P).values()})
        with mode, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            form(*c.base[0], c.P)
        keys |= mode.keys
    return keys


# Keys no test reaches, and why. Strict xfails: covering one fails until its entry goes.
UNCOVERED = {
    T.cuda: "needs a CUDA device (tests/test_cuda.py)",
    torch.rand_like: "random values: no per-example oracle",
    torch.randn_like: "random values: no per-example oracle",
    torch.empty_like: "uninitialized values: no per-example oracle",
    T.new_empty: "uninitialized values: no per-example oracle",
}


@pytest.mark.parametrize("key", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=UNCOVERED[k]))
    if k in UNCOVERED else k for k in rules.RULES], ids=name_of)
def test_every_rule_key_is_exercised(key, covered_keys):
    assert key in covered_keys, \
        f"no form in tests/opspecs.py and no case in tests/test_rules.py reaches {name_of(key)}"


@pytest.mark.parametrize("rule", list({id(r): r for r in rules.RULES.values()}.values()),
                         ids=lambda r: name_of(next(k for k in rules.RULES if rules.RULES[k] is r)))
def test_every_rule_function_has_a_case(rule, case_keys):
    assert any(rules.rule_for(k) is rule for k in case_keys), \
        f"no case in tests/test_rules.py batches through {rule.__qualname__}"


# -- the reference models run with no per-example fallback, and no vmap --------------------

VOCAB, CLASSES = 20, 5


@dataclass(eq=False)
class Node:         # the tree protocol of dynbatch/models/tree_lstm.py; label -1: no loss
    label: int
    word_id: int | None = None
    children: tuple = ()


def binary_tree(rng, leaves):
    if leaves == 1:
        return Node(rng.randrange(CLASSES), rng.randrange(VOCAB))
    k = rng.randint(1, leaves - 1)
    return Node(rng.randrange(-1, CLASSES), None,
                (binary_tree(rng, k), binary_tree(rng, leaves - k)))


def nary_tree(rng, depth):
    children = tuple(nary_tree(rng, depth - 1) for _ in range(rng.randint(0, 3) if depth else 0))
    return Node(rng.randrange(CLASSES), rng.randrange(VOCAB), children)


def tagged(rng):
    words = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
    return words, [rng.randrange(CLASSES) for _ in words]


MODELS = {      # name: (model, one example, the per-example code)
    "BinaryTreeLSTM": (lambda: BinaryTreeLSTM(VOCAB, 6, 6, CLASSES).eval(),
                       lambda rng: binary_tree(rng, rng.randint(1, 7)), lambda t, m: m(t)),
    "ChildSumTreeLSTM": (lambda: ChildSumTreeLSTM(VOCAB, 6, 6, CLASSES),
                         lambda rng: nary_tree(rng, rng.randint(0, 3)), lambda t, m: m(t)),
    "BiLSTMTagger": (lambda: BiLSTMTagger(VOCAB, 6, 6, CLASSES), tagged, lambda ex, m: m(*ex)),
}


@pytest.mark.parametrize("name", MODELS)
def test_reference_model_runs_every_batch_through_a_rule(name):
    make, draw, per_example = MODELS[name]
    torch.manual_seed(0)
    rng = random.Random(0)
    with strict():
        assert_matches_eager(per_example, [draw(rng) for _ in range(6)], make(), atol=1e-8)
    stats = db.stats()
    assert (stats.fallbacks, stats.vmap_batches) == (0, 0), f"{name}: {stats}"
