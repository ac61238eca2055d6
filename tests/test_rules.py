"""Batching rules against their semantics.

For every case: the registered rule on stacked per-example inputs equals ``vmap_rule`` (the
definition of batching) and equals the stacked loop of eager per-example calls (functorch's
``loop``). Cases name the callable exactly as the tracer records it (``Tensor.__add__`` for
``x + y``, ``Tensor.__getitem__`` for ``x[i]``). STRICT is on, so a case that only passes by
running one example at a time fails; ``direct`` cases must not even reach vmap.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dynbatch import rules, specialize
from dynbatch.rules import FallbackError

T = torch.Tensor
B = 3          # examples per case
ATOL = 1e-8


class P:
    """A per-example argument: one tensor per example, stacked on dim 0 for the rule."""

    def __init__(self, values):
        self.values = values


class S:
    """A shared tensor argument: the same for every example, passed to the rule as is."""

    def __init__(self, value):
        self.value = value


def _r(shape):
    return torch.randn(shape, dtype=torch.float64)


def p(*shape):
    return P([_r(shape) for _ in range(B)])


def ppos(*shape):
    return P([_r(shape).abs() + 0.5 for _ in range(B)])


def pint(high, *shape):
    return P([torch.randint(high, shape) for _ in range(B)])


def pbool(*shape):
    return P([torch.rand(shape) > 0.5 for _ in range(B)])


def pvals(*values):
    return P([torch.as_tensor(v) for v in values])


def s(*shape):
    return S(_r(shape))


def sint(high, *shape):
    return S(torch.randint(high, shape))


# (id, fn, builder, direct): builder() -> (args, kwargs). ``direct``: the registered rule
# makes the batched call itself, without vmap.
CASES = []


def case(id, fn, builder, direct=True):
    CASES.append(pytest.param(fn, builder, direct, id=id))


# -- elementwise, unary and binary, with broadcasting ------------------------------------
for _name, _fn in [("torch.tanh", torch.tanh), ("torch.sigmoid", torch.sigmoid),
                   ("torch.exp", torch.exp), ("torch.relu", torch.relu),
                   ("Tensor.abs", T.abs), ("Tensor.neg", T.neg), ("F.relu", F.relu),
                   ("F.gelu", F.gelu), ("F.silu", F.silu), ("torch.sin", torch.sin),
                   ("Tensor.tanh", T.tanh), ("Tensor.sigmoid", T.sigmoid)]:
    case(f"unary-{_name}", _fn, lambda: ((p(2, 4),), {}))
case("unary-0d", torch.tanh, lambda: ((p(),), {}))
case("unary-log-positive", torch.log, lambda: ((ppos(5),), {}))
case("unary-sqrt", torch.sqrt, lambda: ((ppos(5),), {}))
case("unary-F.leaky_relu-kw", F.leaky_relu, lambda: ((p(5),), {"negative_slope": 0.3}))
case("binary-add-same", torch.add, lambda: ((p(4), p(4)), {}))
case("binary-add-alpha", torch.add, lambda: ((p(4), p(4)), {"alpha": 2.5}))
case("binary-add-shared-same-rank", torch.add, lambda: ((p(4), s(4)), {}))
case("binary-add-shared-higher-rank", torch.add, lambda: ((p(4), s(3, 4)), {}))
case("binary-add-shared-higher-rank-first", torch.add, lambda: ((s(2, 3, 4), p(4)), {}))
case("binary-mul-0d-per-example-shared-matrix", torch.mul, lambda: ((p(), s(3, 4)), {}))
case("binary-mul-0d-with-per-example", torch.mul, lambda: ((p(), p(3, 4)), {}))
case("binary-mul-ranks-differ", torch.mul, lambda: ((p(4), p(3, 4)), {}))
case("binary-sub-scalar", torch.sub, lambda: ((p(4), 1.5), {}))
case("binary-div-shared-0d", torch.div, lambda: ((p(4), S(torch.tensor(2.0))), {}))
case("binary-maximum", torch.maximum, lambda: ((p(3, 4), s(4)), {}))
case("binary-atan2", torch.atan2, lambda: ((p(4), p(4)), {}))
case("binary-pow", torch.pow, lambda: ((ppos(4), 1.7), {}))
case("binary-eq", torch.eq, lambda: ((pint(3, 5), sint(3, 5)), {}))

# -- Tensor operators ---------------------------------------------------------------------
case("op-add", T.__add__, lambda: ((p(4), p(4)), {}))
case("op-add-shared-higher", T.__add__, lambda: ((p(4), s(2, 4)), {}))
case("op-radd-scalar", T.__radd__, lambda: ((p(4), 2.0), {}))
case("op-sub", T.__sub__, lambda: ((p(4), s(4)), {}))
case("op-sub-shared-first", T.__sub__, lambda: ((s(3, 4), p(4)), {}))
case("op-rsub-scalar", T.__rsub__, lambda: ((p(4), 1.5), {}))
case("op-mul", T.__mul__, lambda: ((p(2, 4), p(4)), {}))
case("op-rmul-scalar", T.__rmul__, lambda: ((p(4), 3), {}))
case("op-truediv", T.__truediv__, lambda: ((p(4), ppos(4)), {}))
case("op-rtruediv-scalar", T.__rtruediv__, lambda: ((ppos(4), 1.0), {}))
case("op-pow-int", T.__pow__, lambda: ((p(4), 2), {}))
case("op-pow-shared", T.__pow__, lambda: ((ppos(4), s(4)), {}))
case("op-rpow-scalar", T.__rpow__, lambda: ((p(4), 2.0), {}))
case("op-neg", T.__neg__, lambda: ((p(4),), {}))
case("op-lt", T.__lt__, lambda: ((p(4), 0.0), {}))
case("op-ge-shared", T.__ge__, lambda: ((p(4), s(4)), {}))
case("op-floordiv", T.__floordiv__, lambda: ((p(4), 0.7), {}))
case("op-mod", T.__mod__, lambda: ((p(4), 0.7), {}))
case("op-matmul", T.__matmul__, lambda: ((p(2, 3), s(3, 4)), {}))
case("op-matmul-shared-first", T.__matmul__, lambda: ((s(4, 3), p(3)), {}))
case("op-matmul-both", T.__matmul__, lambda: ((p(2, 3), p(3, 4)), {}))

# -- matmul in every combination the rule handles ------------------------------------------
for _fn, _tag in [(torch.matmul, "torch.matmul"), (T.matmul, "Tensor.matmul")]:
    case(f"{_tag}-pe1d@sh2d", _fn, lambda: ((p(3), s(3, 4)), {}))
    case(f"{_tag}-pe2d@sh2d", _fn, lambda: ((p(2, 3), s(3, 4)), {}))
    case(f"{_tag}-pe2d@sh1d", _fn, lambda: ((p(2, 3), s(3)), {}))
    case(f"{_tag}-pe1d@sh1d", _fn, lambda: ((p(3), s(3)), {}))
    case(f"{_tag}-pe3d@sh2d", _fn, lambda: ((p(2, 2, 3), s(3, 4)), {}))
    case(f"{_tag}-sh2d@pe1d", _fn, lambda: ((s(4, 3), p(3)), {}))
    case(f"{_tag}-sh1d@pe1d", _fn, lambda: ((s(3), p(3)), {}))
    case(f"{_tag}-sh2d@pe2d", _fn, lambda: ((s(2, 3), p(3, 4)), {}))
    case(f"{_tag}-sh1d@pe2d", _fn, lambda: ((s(3), p(3, 4)), {}))
    case(f"{_tag}-sh2d@pe3d", _fn, lambda: ((s(2, 3), p(5, 3, 4)), {}))
    case(f"{_tag}-pe1d@pe1d", _fn, lambda: ((p(3), p(3)), {}))
    case(f"{_tag}-pe2d@pe2d", _fn, lambda: ((p(2, 3), p(3, 4)), {}))
    case(f"{_tag}-pe2d@pe1d", _fn, lambda: ((p(2, 3), p(3)), {}))
    case(f"{_tag}-pe1d@pe2d", _fn, lambda: ((p(3), p(3, 4)), {}))
    case(f"{_tag}-pe3d@pe3d", _fn, lambda: ((p(2, 2, 3), p(2, 3, 4)), {}))
case("torch.mm-pe@sh", torch.mm, lambda: ((p(2, 3), s(3, 4)), {}))
case("torch.mm-sh@pe", torch.mm, lambda: ((s(2, 3), p(3, 4)), {}))
case("torch.mm-pe@pe", torch.mm, lambda: ((p(2, 3), p(3, 4)), {}))
case("torch.mv-pe@sh", torch.mv, lambda: ((p(2, 3), s(3)), {}))
case("torch.mv-sh@pe", torch.mv, lambda: ((s(2, 3), p(3)), {}))
case("torch.mv-pe@pe", torch.mv, lambda: ((p(2, 3), p(3)), {}))

# -- linear --------------------------------------------------------------------------------
case("F.linear-1d", F.linear, lambda: ((p(3), s(4, 3), s(4)), {}))
case("F.linear-2d", F.linear, lambda: ((p(2, 3), s(4, 3), s(4)), {}))
case("F.linear-nobias", F.linear, lambda: ((p(3), s(4, 3)), {}))
case("F.linear-bias-kw", F.linear, lambda: ((p(3), s(4, 3)), {"bias": S(_r((4,))).value}))

# -- cat / stack with shared members -------------------------------------------------------
case("cat-all-per-example", torch.cat, lambda: (([p(3), p(2)],), {}))
case("cat-mixed-shared", torch.cat, lambda: (([p(3), s(2), p(1)],), {}))
case("cat-mixed-dim-kw", torch.cat, lambda: (([s(2, 3), p(2, 1)],), {"dim": 1}))
case("cat-mixed-dim-neg", torch.cat, lambda: (((p(2, 3), s(2, 2)), -1), {}))
case("cat-dim0-2d", torch.cat, lambda: (([p(2, 3), s(1, 3)], 0), {}))
case("torch.concat", torch.concat, lambda: (([p(3), s(2)],), {}))
case("stack-all-per-example", torch.stack, lambda: (([p(3), p(3)],), {}))
case("stack-mixed", torch.stack, lambda: (([p(3), s(3), p(3)],), {}))
case("stack-dim1", torch.stack, lambda: (([s(2, 3), p(2, 3)], 1), {}))
case("stack-dim-neg-kw", torch.stack, lambda: (([p(2, 3), p(2, 3)],), {"dim": -1}))

# -- chunk / split / unbind ---------------------------------------------------------------
case("torch.chunk", torch.chunk, lambda: ((p(6), 3), {}))
case("torch.chunk-dim", torch.chunk, lambda: ((p(2, 6), 2, 1), {}))
case("Tensor.chunk-dim-kw", T.chunk, lambda: ((p(2, 6), 3), {"dim": -1}))
case("torch.split-size", torch.split, lambda: ((p(5), 2), {}))
case("torch.split-sections-dim", torch.split, lambda: ((p(2, 5), [1, 4]), {"dim": 1}))
case("Tensor.split-neg", T.split, lambda: ((p(2, 6), 3, -1), {}))
case("torch.unbind", torch.unbind, lambda: ((p(3, 2),), {}))
case("Tensor.unbind-dim", T.unbind, lambda: ((p(3, 2), 1), {}))

# -- getitem -------------------------------------------------------------------------------
G = T.__getitem__
case("getitem-int", G, lambda: ((p(4, 3), 1), {}))
case("getitem-neg-int", G, lambda: ((p(4, 3), -1), {}))
case("getitem-slice", G, lambda: ((p(5), slice(1, 4)), {}))
case("getitem-slice-step", G, lambda: ((p(6, 2), slice(None, None, 2)), {}))
case("getitem-None", G, lambda: ((p(4), None), {}))
case("getitem-Ellipsis", G, lambda: ((p(2, 3, 4), (Ellipsis, 1)), {}))
case("getitem-tuple", G, lambda: ((p(4, 3), (slice(1, 3), None, 2)), {}))
case("getitem-0d", G, lambda: ((p(4), 2), {}))
case("getitem-shared-index", G, lambda: ((p(5, 2), S(torch.tensor([4, 0, 0]))), {}))
case("getitem-shared-mask", G, lambda: ((p(4), S(torch.tensor([True, False, True, True]))),
                                        {}))
case("getitem-shared-index-in-tuple", G, lambda: ((p(3, 5), (slice(None),
                                                              S(torch.tensor([1, 3])).value)),
                                                  {}))
case("getitem-list-index", G, lambda: ((p(5), [0, 3, 3]), {}))
case("getitem-table-by-pe-0d", G, lambda: ((s(7, 3), pint(7)), {}))
case("getitem-table-by-pe-1d", G, lambda: ((s(7, 3), pint(7, 4)), {}))
case("getitem-vector-by-pe-0d", G, lambda: ((s(7), pint(7)), {}))
case("getitem-both-pe-0d", G, lambda: ((p(5, 3), pint(5)), {}))
case("getitem-both-pe-1d", G, lambda: ((p(5, 3), pint(5, 4)), {}))
case("getitem-both-pe-2d", G, lambda: ((p(5), pint(5, 2, 3)), {}))

# -- embedding -------------------------------------------------------------------------------
case("F.embedding-0d", F.embedding, lambda: ((pint(9), s(9, 4)), {}))
case("F.embedding-1d", F.embedding, lambda: ((pint(9, 5), s(9, 4)), {}))
case("F.embedding-padding", F.embedding, lambda: ((pint(9, 5), s(9, 4)), {"padding_idx": 0}))

# -- reductions ------------------------------------------------------------------------------
for _name in ["sum", "mean", "amax", "logsumexp", "std", "max", "argmax", "prod", "amin",
              "min", "argmin", "var"]:
    for _fn, _tag in [(getattr(torch, _name), "torch"), (getattr(T, _name), "Tensor")]:
        if _name != "logsumexp":       # logsumexp requires dim
            case(f"{_tag}.{_name}-all", _fn, lambda: ((p(3, 4),), {}))
        case(f"{_tag}.{_name}-dim-kw", _fn, lambda: ((p(3, 4),), {"dim": 1}))
        case(f"{_tag}.{_name}-dim-pos-neg", _fn, lambda: ((p(3, 4), -2), {}))
        case(f"{_tag}.{_name}-keepdim", _fn, lambda: ((p(3, 4),), {"dim": 0, "keepdim": True}))
case("sum-dim-tuple", torch.sum, lambda: ((p(2, 3, 4),), {"dim": (0, 2)}))
case("sum-dim-tuple-neg", T.sum, lambda: ((p(2, 3, 4), (-1, 0)), {}))
case("sum-1d-all", torch.sum, lambda: ((p(5),), {}))
case("mean-0d", torch.mean, lambda: ((p(),), {}))
case("max-elementwise", torch.max, lambda: ((p(4), p(4)), {}))
case("max-elementwise-shared", torch.max, lambda: ((p(3, 4), s(4)), {}))
case("argmax-int-input", torch.argmax, lambda: ((pint(10, 6),), {}))

# -- softmax / log_softmax -------------------------------------------------------------------
case("F.softmax", F.softmax, lambda: ((p(5),), {"dim": -1}))
case("F.softmax-dim0", F.softmax, lambda: ((p(3, 5),), {"dim": 0}))
case("F.log_softmax", F.log_softmax, lambda: ((p(3, 5),), {"dim": 1}))
case("torch.softmax-pos", torch.softmax, lambda: ((p(3, 5), 1), {}))
case("torch.log_softmax-neg", torch.log_softmax, lambda: ((p(3, 5), -1), {}))
case("Tensor.softmax", T.softmax, lambda: ((p(3, 5), 0), {}))
case("Tensor.log_softmax-kw", T.log_softmax, lambda: ((p(5),), {"dim": 0}))

# -- where / clamp ---------------------------------------------------------------------------
case("where-all-pe", torch.where, lambda: ((pbool(4), p(4), p(4)), {}))
case("where-shared-other", torch.where, lambda: ((pbool(4), p(4), s(4)), {}))
case("where-scalar-other", torch.where, lambda: ((pbool(4), p(4), 0.0), {}))
case("where-shared-cond-higher", torch.where, lambda: ((S(torch.rand(2, 4) > 0.5), p(4), 1.0),
                                                      {}))
case("where-0d-cond", torch.where, lambda: ((pbool(), p(4), s(3, 4)), {}))
case("Tensor.where", T.where, lambda: ((p(4), pbool(4), 0.5), {}))
case("clamp-kw", torch.clamp, lambda: ((p(4),), {"min": -0.5, "max": 0.5}))
case("clamp-pos", T.clamp, lambda: ((p(4), -0.1, 0.2), {}))
case("clamp-min-only", torch.clamp, lambda: ((p(4),), {"min": 0.0}))
case("clamp-shared-tensor-bounds", torch.clamp, lambda: ((p(4), s(4), None), {}))
case("clamp-shared-higher-rank-kw", torch.clamp, lambda: ((p(4),), {"min": _r((2, 4))}))
case("clip", torch.clip, lambda: ((p(4), -1.0, 1.0), {}))

# -- shape ops -------------------------------------------------------------------------------
case("reshape-varargs", T.reshape, lambda: ((p(6), 2, 3), {}))
case("reshape-tuple", T.reshape, lambda: ((p(2, 3), (3, 2)), {}))
case("reshape-minus-one", T.reshape, lambda: ((p(2, 3), -1), {}))
case("reshape-to-0d", T.reshape, lambda: ((p(1), ()), {}))
case("torch.reshape", torch.reshape, lambda: ((p(2, 3), (3, -1)), {}))
case("view-varargs", T.view, lambda: ((p(6), 3, 2), {}))
case("view-tuple", T.view, lambda: ((p(2, 3), (6,)), {}))
case("transpose", T.transpose, lambda: ((p(2, 3), 0, 1), {}))
case("transpose-neg", torch.transpose, lambda: ((p(2, 3, 4), -1, -3), {}))
case("t-2d", T.t, lambda: ((p(2, 3),), {}))
case("t-1d", T.t, lambda: ((p(3),), {}))
case("torch.t-2d", torch.t, lambda: ((p(2, 3),), {}))
case("permute-varargs", T.permute, lambda: ((p(2, 3, 4), 2, 0, 1), {}))
case("permute-tuple-neg", torch.permute, lambda: ((p(2, 3, 4), (-1, 0, 1)), {}))
case("squeeze-all", T.squeeze, lambda: ((p(1, 3, 1),), {}))
case("squeeze-dim", torch.squeeze, lambda: ((p(1, 3, 1), 2), {}))
case("squeeze-no-size1", T.squeeze, lambda: ((p(3),), {}))
case("unsqueeze-0", T.unsqueeze, lambda: ((p(3),), {"dim": 0}))
case("unsqueeze-neg", torch.unsqueeze, lambda: ((p(2, 3), -1), {}))
case("flatten-all", torch.flatten, lambda: ((p(2, 3, 4),), {}))
case("flatten-start", T.flatten, lambda: ((p(2, 3, 4), 1), {}))
case("flatten-0d", torch.flatten, lambda: ((p(),), {}))
case("expand-same-rank", T.expand, lambda: ((p(1, 4), 3, 4), {}))
case("expand-minus-one", T.expand, lambda: ((p(1, 4), (2, -1)), {}))
case("expand-new-leading-dim", T.expand, lambda: ((p(4), 2, 4), {}))
case("expand-new-leading-dim-equal-to-batch", T.expand, lambda: ((p(4), B, 4), {}))
case("expand_as-per-example", T.expand_as, lambda: ((p(1, 4), p(3, 4)), {}))
case("expand_as-shared-target", T.expand_as, lambda: ((p(4), s(2, 4)), {}))
case("view_as-shared-target", T.view_as, lambda: ((p(6), s(2, 3)), {}))

# -- layer_norm ------------------------------------------------------------------------------
case("F.layer_norm-1d", F.layer_norm, lambda: ((p(5), (5,), s(5), s(5)), {}))
case("F.layer_norm-2d", F.layer_norm, lambda: ((p(3, 5), (5,), s(5), s(5)), {}))
case("F.layer_norm-no-affine", F.layer_norm, lambda: ((p(2, 5), [5]), {}))
case("F.layer_norm-2d-normalized", F.layer_norm, lambda: ((p(3, 5), (3, 5)), {"eps": 1e-3}))

# -- cross_entropy: one example is 1-d logits [C] and a 0-d target ---------------------------
_CE_TARGETS = (2, 0, 3)
for _red in ("mean", "sum", "none"):
    case(f"cross_entropy-{_red}", F.cross_entropy,
         lambda _red=_red: ((p(4), pvals(*_CE_TARGETS)), {"reduction": _red}))
    case(f"cross_entropy-{_red}-weight", F.cross_entropy,
         lambda _red=_red: ((p(4), pvals(*_CE_TARGETS)),
                            {"reduction": _red, "weight": _r((4,)).abs() + 0.1}))
    # ignore_index hits examples[1] (target 0); its 'mean' loss is nan (0 / 0), as in eager
    case(f"cross_entropy-{_red}-ignore", F.cross_entropy,
         lambda _red=_red: ((p(4), pvals(*_CE_TARGETS)), {"reduction": _red,
                                                          "ignore_index": 0}))
    case(f"cross_entropy-{_red}-weight-ignore", F.cross_entropy,
         lambda _red=_red: ((p(4), pvals(*_CE_TARGETS)),
                            {"reduction": _red, "ignore_index": 3,
                             "weight": _r((4,)).abs() + 0.1}))
case("cross_entropy-default", F.cross_entropy, lambda: ((p(4), pvals(*_CE_TARGETS)), {}))
case("nll_loss-mean", F.nll_loss, lambda: ((p(4), pvals(*_CE_TARGETS)), {}))
case("nll_loss-weight-sum", F.nll_loss, lambda: ((p(4), pvals(*_CE_TARGETS)),
                                                 {"reduction": "sum", "weight": _r((4,))}))


# -- the machinery ---------------------------------------------------------------------------

def _resolve(a):
    """Builders may return S(...) inside kwargs; unwrap."""
    return a.value if isinstance(a, S) else a


def stacked(args):
    """(args for the rule, per_example flags)."""
    out, flags = [], []
    for a in args:
        if isinstance(a, P):
            out.append(torch.stack(a.values))
            flags.append(True)
        elif isinstance(a, S):
            out.append(a.value)
            flags.append(False)
        elif isinstance(a, (list, tuple)) and any(isinstance(x, (P, S)) for x in a):
            members, inner = [], []
            for x in a:
                if isinstance(x, P):
                    members.append(torch.stack(x.values))
                    inner.append(True)
                else:
                    members.append(_resolve(x))
                    inner.append(False)
            out.append(type(a)(members))
            flags.append(tuple(inner) if any(inner) else False)
        else:
            out.append(a)
            flags.append(False)
    return tuple(out), tuple(flags)


def example_args(args, i):
    def one(a):
        if isinstance(a, P):
            return a.values[i]
        if isinstance(a, S):
            return a.value
        if isinstance(a, (list, tuple)) and any(isinstance(x, (P, S)) for x in a):
            return type(a)(one(x) for x in a)
        return a
    return tuple(one(a) for a in args)


def components(out):
    if isinstance(out, torch.Tensor):
        return [out]
    assert isinstance(out, (tuple, list)), type(out)
    return list(out)


def loop(fn, args, kwargs):
    rows = [components(fn(*example_args(args, i), **kwargs)) for i in range(B)]
    return [torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))]


def assert_same(actual, expected, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs vs {len(expected)}"
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{k}]: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{what}[{k}]: dtype {a.dtype} vs {e.dtype}"
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, e, atol=ATOL, rtol=1e-7, equal_nan=True,
                                       msg=lambda m: f"{what}[{k}]: {m}")
        else:
            assert torch.equal(a, e), f"{what}[{k}]: {a} vs {e}"


@pytest.mark.parametrize("fn, builder, direct", CASES)
def test_rule_matches_vmap_and_loop(fn, builder, direct, strict):
    torch.manual_seed(0)
    args, kwargs = builder()
    kwargs = {k: _resolve(v) for k, v in kwargs.items()}
    assert fn in rules.RULES, f"{rules.name_of(fn)} has no direct batching rule"
    rule = rules.rule_for(fn)
    assert rule is rules.RULES[fn] and rule is not rules.vmap_rule
    batch_args, flags = stacked(args)
    expected = loop(fn, args, kwargs)
    before = dict(rules.counters)
    got = components(rule(fn, batch_args, kwargs, flags))
    if direct:
        assert rules.counters["vmap"] == before["vmap"], \
            f"the rule for {rules.name_of(fn)} delegated to vmap"
    assert rules.counters["fallbacks"] == before["fallbacks"]
    assert_same(got, expected, "rule vs loop")
    via_vmap = components(rules.vmap_rule(fn, batch_args, kwargs, flags))
    assert_same(got, via_vmap, "rule vs vmap_rule")
    assert rules.counters["fallbacks"] == before["fallbacks"]


def test_rule_for_unknown_callable_is_vmap():
    def mine(x):
        return x * 2
    assert mine not in rules.RULES
    assert rules.rule_for(mine) is rules.vmap_rule


REQUIRED = {
    "elementwise": [torch.tanh, torch.sigmoid, torch.relu, torch.exp, torch.log, torch.add,
                    torch.mul, torch.sub, torch.div, torch.pow, torch.maximum, T.tanh,
                    T.sigmoid, F.relu, F.gelu, F.sigmoid, F.tanh],
    "operators": [T.__add__, T.__radd__, T.__sub__, T.__rsub__, T.__mul__, T.__rmul__,
                  T.__truediv__, T.__rtruediv__, T.__pow__, T.__rpow__, T.__matmul__,
                  T.__neg__],
    "matmul": [torch.matmul, T.matmul, torch.mm, torch.mv],
    "linear": [F.linear],
    "cat": [torch.cat, torch.stack],
    "split": [torch.chunk, T.chunk, torch.split, T.split, torch.unbind, T.unbind],
    "getitem": [T.__getitem__],
    "embedding": [F.embedding],
    "reductions": [torch.sum, T.sum, torch.mean, T.mean, torch.amax, torch.max, T.max,
                   torch.argmax, torch.logsumexp, torch.std],
    "softmax": [F.softmax, F.log_softmax, torch.softmax, T.softmax, T.log_softmax],
    "where/clamp": [torch.where, torch.clamp, T.clamp],
    "shape": [T.reshape, T.view, T.transpose, T.t, T.permute, T.squeeze, T.unsqueeze,
              T.flatten, T.expand, torch.reshape, torch.transpose, torch.flatten],
    "layer_norm": [F.layer_norm],
    "cross_entropy": [F.cross_entropy],
}


@pytest.mark.parametrize("category", sorted(REQUIRED))
def test_categories_have_direct_rules(category):
    missing = [rules.name_of(f) for f in REQUIRED[category] if f not in rules.RULES]
    assert not missing, f"{category}: no direct rule for {missing}"


# -- the visible per-example fallback --------------------------------------------------------

def _reads_a_value(x):
    # .item() has no vmap rule: vmap_rule must fall back to one call per example
    return x * x.sum().item()


def test_loop_fallback_warns_once_and_counts():
    x = torch.randn(4, 3)
    before = rules.counters["fallbacks"]

    def fn(v):                      # a fresh callable, so its "warn once" state is fresh
        return _reads_a_value(v)
    with pytest.warns(UserWarning, match="one example at a time"):
        out = rules.vmap_rule(fn, (x,), {}, (True,))
    torch.testing.assert_close(out, torch.stack([_reads_a_value(r) for r in x]), atol=ATOL,
                               rtol=0)
    assert rules.counters["fallbacks"] == before + 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a second warning would raise here
        out2 = rules.loop_rule(fn, (x,), {}, (True,), reason=RuntimeError("again"))
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    assert rules.counters["fallbacks"] == before + 8


def test_loop_fallback_tuple_outputs_and_shared_args():
    x = torch.randn(3, 4)
    w = torch.randn(4)

    def fn(v, shared):
        return torch.max(v * shared, 0)
    with pytest.warns(UserWarning):
        values, idx = rules.loop_rule(fn, (x, w), {}, (True, False), reason=None)
    ev = torch.stack([torch.max(r * w, 0).values for r in x])
    ei = torch.stack([torch.max(r * w, 0).indices for r in x])
    assert torch.equal(values, ev) and torch.equal(idx, ei)


def test_loop_fallback_is_an_error_under_strict(strict):
    x = torch.randn(2, 3)
    before = rules.counters["fallbacks"]

    def fn(v):
        return _reads_a_value(v)
    with pytest.raises(FallbackError, match="one example at a time"):
        rules.vmap_rule(fn, (x,), {}, (True,))
    with pytest.raises(FallbackError):
        rules.loop_rule(fn, (x,), {}, (True,))
    assert rules.counters["fallbacks"] == before
    assert issubclass(FallbackError, RuntimeError)


@pytest.mark.parametrize("fn, builder, direct", CASES)
def test_specialization_matches_loop(fn, builder, direct, strict):
    """Where ``specialize.specialize`` fixes a rule's decision once per signature, the rewritten
    plain call must compute what the per-example loop computes."""
    torch.manual_seed(0)
    args, kwargs = builder()
    kwargs = {k: _resolve(v) for k, v in kwargs.items()}
    batch_args, flags = stacked(args)
    spec = specialize.specialize(rules.rule_for(fn), fn, batch_args, kwargs, flags)
    if spec is None:
        pytest.skip("no specialization: the rule decides per batch")
    call, edits = spec
    call_args = list(batch_args)
    call_kwargs = specialize.apply_edits(call_args, kwargs, edits)
    assert all(not isinstance(v, torch.Tensor) for _, v in edits), "an edit holds a tensor"
    got = components(call(*call_args, **call_kwargs))
    assert_same(got, loop(fn, args, kwargs), "specialized call vs loop")
