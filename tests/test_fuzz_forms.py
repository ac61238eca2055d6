"""Differential fuzzing of call forms: every form of ``tests/opspecs.py``, eager vs batched.

The promise under test: a function written for ONE example, decorated ``@db.batched`` and
called on a list of examples, returns exactly what the eager per-example code returns:
values, dtypes, shapes, ``requires_grad``, containers, and the gradients of every shared
parameter and of every per-example input that requires grad, ``grad is None`` included.

Only the public API is used: ``db.batched``.
The oracle is eager PyTorch run in the test itself, on the same inputs and weights:
    values     exact for integer and bool dtypes; float64 atol 1e-8 rtol 1e-6; float32 atol
               1e-5 rtol 1e-4; float16 / bfloat16 4 eps of the dtype (atol scaled by the
               tensor's largest magnitude); nan where eager has nan, the same infinities
    dtype, shape, requires_grad, the pytree structure (container types, keys, order), and
               non-tensor leaves equal
    gradients  after ``backward`` of every float output (and of a scalar made from it, so
               the upstream gradient is not all ones): the same tolerance, None where None

Tests:
    test_table_is_sound       eager only: every form runs for every declared dtype and the
                              forms of a meaning agree (the table's own claims)
    test_form                 every (op, meaning, form) once, fixed seed, float64 and one
                              integer / half dtype where valid
    test_fuzz                 hypothesis: form, rank, sizes, ragged dim, dtype, 0-d flag,
                              2-5 examples, which inputs require grad
    test_zero_d               0-d per-example tensors: x.sum() then an op with dim 0 / -1
    test_mixed_dtypes         0-d operands and Python scalars in type promotion
    test_autocast             the batched call inside torch.autocast('cpu', bfloat16)
    test_containers           nested dict / OrderedDict / namedtuple / tuple / list returns
    test_grad_none            a parameter used only through non-differentiable ops
    test_two_threads          the same draw from two threads at once
"""
from __future__ import annotations

import contextlib
import math
import random
import re
import threading
import types
import zlib
from dataclasses import dataclass

import opspecs as S
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from opspecs import BF16, BOOL, F16, F32, F64, I8, I64, T

import dynbatch as db

# Deprecated forms (F.softmax without dim, reduce=False), std over one element and
# dynbatch's own per-example fallback warn; none of that is what these tests judge.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N_EXAMPLES = (2, 5)


# -- drawing ----------------------------------------------------------------------------

class Draws:
    """Choices from hypothesis."""

    def __init__(self, data):
        self.data = data

    def int(self, lo, hi, label=None):
        return self.data.draw(st.integers(lo, hi), label=label)

    def pick(self, seq, label=None):
        return self.data.draw(st.sampled_from(list(seq)), label=label)

    def bool(self, label=None):
        return self.data.draw(st.booleans(), label=label)


class Seeded:
    """The same choices from a seeded RNG (the parametrized tests)."""

    def __init__(self, seed):
        self.r = random.Random(seed)

    def int(self, lo, hi, label=None):
        return self.r.randint(lo, hi)

    def pick(self, seq, label=None):
        return self.r.choice(list(seq))

    def bool(self, label=None):
        return self.r.random() < 0.5


_TOKEN = re.compile(r"\*(?:\[(-?\d*):(-?\d*)\])?|[A-Za-z_]\w*|\d+")


def _tokens(shape: str):
    for tok in _TOKEN.finditer(shape):
        text = tok.group(0)
        if text.startswith("*"):
            a, b = tok.group(1), tok.group(2)
            yield ("star", slice(int(a) if a else None, int(b) if b else None))
        elif text.isdigit():
            yield ("fixed", int(text))
        else:
            yield ("dim", text)


def _resolve(shape: str, star: list, sizes: dict, n: int) -> tuple:
    out = []
    for kind, v in _tokens(shape):
        if kind == "star":
            out.extend(n if d == "n" else sizes[d] for d in star[v])
        elif kind == "fixed":
            out.append(v)
        else:
            out.append(n if v == "n" else sizes[v])
    return tuple(out)


def _values(t: T, shape: tuple, dtype: torch.dtype, gen, sizes: dict, n: int):
    dt = t.dtype or dtype
    numel = math.prod(shape)
    if t.dom == "index":
        hi = n if t.hi == "n" else sizes[t.hi]
        return torch.randint(0, hi, shape, generator=gen, dtype=I64)
    if t.dom == "mask" or dt == BOOL:
        return torch.rand(shape, generator=gen, dtype=F64) < 0.5
    fl = dt.is_floating_point
    dom = t.dom
    if dom == "distinct":
        v = (torch.randperm(numel, generator=gen) - numel // 2).to(F64).reshape(shape)
        return (v * 0.5 if fl else v).to(dt)
    if dom == "few":
        return torch.randint(-1, 2, shape, generator=gen).to(dt)
    if not fl:
        lo, hi = {"any": (-5, 6), "pos": (1, 6), "nonzero": (1, 6), "exp": (0, 4),
                  "unit": (0, 2), "nan": (-5, 6), "big": (-60, 61)}[dom]
        v = torch.randint(lo, hi, shape, generator=gen)
        if dom == "nonzero":
            v = v * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
        return v.to(dt)
    r = torch.randn(shape, generator=gen, dtype=F64)
    u = torch.rand(shape, generator=gen, dtype=F64)
    if dom == "any":
        v = r
    elif dom == "big":
        v = r * 40
    elif dom == "pos":
        v = u * 2 + 0.5
    elif dom == "nonzero":
        v = (u * 1.5 + 0.5) * torch.where(r < 0, -1.0, 1.0)
    elif dom == "unit":
        v = u
    elif dom == "exp":
        v = u * 2
    elif dom == "nan":
        special = torch.tensor([math.nan, math.inf, -math.inf], dtype=F64)
        pick = torch.randint(0, 3, shape, generator=gen)
        v = torch.where(u < 0.4, special[pick], r)
    elif dom == "simplex":
        v = torch.softmax(r, -1)
    else:
        raise ValueError(dom)
    return v.to(dt)


@dataclass
class Case:
    """One drawn case: inputs for each example (base values), shared tensors."""
    label: str
    dtype: torch.dtype
    names: tuple                 # per-example input names, in the form's order
    base: list                   # per example: tuple of tensors (detached)
    flags: list                  # per example: requires_grad of its float inputs
    P: types.SimpleNamespace
    params: list                 # (name, shared tensor that requires grad)
    info: str

    def examples(self):
        """Fresh leaves: one set per run, so eager and batched gradients stay apart."""
        out = []
        for base, flag in zip(self.base, self.flags):
            out.append(tuple(
                t.clone().requires_grad_(flag and t.dtype.is_floating_point) for t in base))
        return out

    def describe(self):
        return f"{self.label} [{_dt(self.dtype)}] {self.info}"


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def build_case(o: S.Op, mn: S.M, dtype, ch, *, label="", n_examples=None, grads=None,
               zero_d=None, rank=None, spread=False, extra_shared=None) -> Case:
    """Draw a case for ``o`` / ``mn``: ranks, sizes, the ragged dim, values.
    ``spread``: sizes and per-example lengths as distinct as the size range allows."""
    lo, hi = S.rank_range(o, mn)
    templates = list(o.inputs.values()) + list(o.shared.values())
    uses_star = any("*" in t.shape for t in templates)
    if not uses_star:
        r = 0
    elif rank is not None:
        r = rank
    else:
        if zero_d is None:
            zero_d = lo == 0 and ch.bool("0-d")
        r = 0 if (zero_d and lo == 0) else ch.int(max(lo, 1) if hi >= 1 else 0, hi, "rank")
    star = [f"s{i}" for i in range(r)]
    refs = set()
    for t in o.shared.values():
        for kind, v in _tokens(t.shape):
            if kind == "star":
                refs.update(range(r)[v])
    ragged_at = [i for i in range(r) if i not in refs] if o.ragged else []
    if ragged_at:
        pos = ch.pick(ragged_at if spread else [None] + ragged_at, "ragged dim")
        if pos is not None:
            star[pos] = "n"
    names = sorted({v for t in templates for kind, v in _tokens(t.shape)
                    if kind == "dim" and v != "n"} |
                   {t.hi for t in templates if t.hi and t.hi != "n"} |
                   {d for d in star if d != "n"})
    lo_s, hi_s = o.sizes
    if spread:
        pool = list(range(lo_s, hi_s + 1))
        start = ch.int(0, len(pool) - 1)
        sizes = {d: pool[(start + k) % len(pool)] for k, d in enumerate(names)}
    else:
        sizes = {d: ch.int(lo_s, hi_s, f"size {d}") for d in names}
    count = n_examples or ch.int(*N_EXAMPLES, "examples")
    if spread:
        pool = list(range(lo_s, hi_s + 1))
        ns = [pool[(k * (len(pool) // 2 + 1) + 1) % len(pool)] for k in range(count)]
    else:
        ns = [ch.int(lo_s, hi_s, "n") for _ in range(count)]
    fl = dtype.is_floating_point and mn.grad
    if not mn.grad:
        grads = "none"
    if grads is None:
        grads = ch.pick(["all", "none", "mixed"], "requires_grad") if fl else "none"
    if grads == "mixed":
        flags = [ch.bool("requires_grad") for _ in range(count)]
    else:
        flags = [grads == "all"] * count
    seed = ch.int(0, 2 ** 31 - 1, "seed")
    gen = torch.Generator().manual_seed(seed)
    base = []
    for n in ns:
        base.append(tuple(_values(t, _resolve(t.shape, star, sizes, n), dtype, gen, sizes, n)
                          for t in o.inputs.values()))
    P = types.SimpleNamespace()
    params = []
    for name, t in o.shared.items():
        v = _values(t, _resolve(t.shape, star, sizes, 1), dtype, gen, sizes, 1)
        if v.dtype.is_floating_point and t.grad and mn.grad:
            v.requires_grad_(True)
            params.append((f"P.{name}", v))
        setattr(P, name, v)
    for name, v in (extra_shared or {}).items():
        if v.dtype.is_floating_point:
            v = v.detach().clone().requires_grad_(True)
            params.append((f"P.{name}", v))
        setattr(P, name, v)
    shapes = [tuple(tuple(t.shape) for t in b) for b in base]
    info = (f"star={star} sizes={sizes} shapes={shapes} requires_grad={flags} "
            f"seed={seed}")
    return Case(label, dtype, tuple(o.inputs), base, flags, P, params, info)


# -- running and comparing ----------------------------------------------------------------

def _is_float(t) -> bool:
    dtype = getattr(t, "dtype", None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def with_scalar(form):
    """The per-example code: the form, and a scalar made from each float result (its
    gradient is the result itself: not all ones, so a permuted gradient shows)."""
    def per_example(ex, P):
        out = form(*ex, P)
        return out, [(t * t).sum() for t in pytree.tree_leaves(out) if _is_float(t)]
    return per_example


def plain(form):
    def per_example(ex, P):
        return form(*ex, P)
    return per_example


def _grads(outs, leaves, backward=True):
    """Gradients of the sum of every float output (each summed) w.r.t. ``leaves``."""
    roots = [t.sum() for t in pytree.tree_leaves(outs)
             if isinstance(t, torch.Tensor) and t.requires_grad]
    if not backward:
        if not roots or not leaves:
            return [None] * len(leaves)
        return list(torch.autograd.grad(roots, leaves, allow_unused=True))
    for t in leaves:
        t.grad = None
    if roots:
        torch.autograd.backward(roots)
    return [None if t.grad is None else t.grad.detach().clone() for t in leaves]


def _tol(dtype, expected, precision=None):
    """(atol, rtol) for eager's dtype; ``precision``: the dtype the computation really ran
    in where that is coarser (autocast), as eager's own precision."""
    if precision is not None and torch.finfo(precision).eps > torch.finfo(dtype).eps:
        dtype = precision
    if dtype == F64:
        return 1e-8, 1e-6
    if dtype == F32:
        return 1e-5, 1e-4
    eps = torch.finfo(dtype).eps
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return 4 * eps * scale, 4 * eps


def assert_tensor(got, want, where, precision=None):
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{where}: not a real tensor ({type(got).__name__}); "
                             f"eager gives {tuple(want.shape)} {_dt(want.dtype)}")
    if got.dtype != want.dtype:
        raise AssertionError(f"{where}: dtype {_dt(got.dtype)} vs eager {_dt(want.dtype)}")
    if got.shape != want.shape:
        raise AssertionError(f"{where}: shape {tuple(got.shape)} vs eager "
                             f"{tuple(want.shape)}")
    if got.requires_grad != want.requires_grad:
        raise AssertionError(f"{where}: requires_grad {got.requires_grad} vs eager "
                             f"{want.requires_grad}")
    g, w = got.detach(), want.detach()
    if torch.equal(g, w):                 # the common case, and exact
        return
    if not (w.dtype.is_floating_point or w.dtype.is_complex):
        if not torch.equal(g, w):
            raise AssertionError(f"{where}: value {g.tolist()} vs eager {w.tolist()}")
        return
    g64, w64 = g.to(F64), w.to(F64)
    nan_g, nan_w = torch.isnan(g64), torch.isnan(w64)
    if not torch.equal(nan_g, nan_w):
        raise AssertionError(f"{where}: nan at {nan_g.nonzero().tolist()} vs eager "
                             f"{nan_w.nonzero().tolist()}")
    inf = torch.isinf(w64) | torch.isinf(g64)
    if not torch.equal(g64[inf], w64[inf]):
        raise AssertionError(f"{where}: infinities {g64[inf].tolist()} vs eager "
                             f"{w64[inf].tolist()}")
    ok = ~(nan_w | inf)
    atol, rtol = _tol(w.dtype, w64, precision)
    diff = (g64 - w64).abs()[ok]
    bound = atol + rtol * w64.abs()[ok]
    if bool((diff > bound).any()):
        raise AssertionError(
            f"{where}: max abs diff {float(diff.max()):.3e} (atol {atol:.1e}, rtol "
            f"{rtol:.1e}); got {_short(g)} vs eager {_short(w)}")


def _short(t):
    text = str(t.tolist())
    return text if len(text) < 160 else text[:157] + "..."


def _spec_text(spec):
    text = str(spec).replace("\n", " ")
    return re.sub(r"\s+", " ", text)[:300]


def assert_same(got, want, where, precision=None):
    g_leaves, g_spec = pytree.tree_flatten(got)
    w_leaves, w_spec = pytree.tree_flatten(want)
    if g_spec != w_spec:
        raise AssertionError(f"{where}: container {_spec_text(g_spec)} vs eager "
                             f"{_spec_text(w_spec)}")
    for k, (g, w) in enumerate(zip(g_leaves, w_leaves)):
        at = f"{where} leaf {k}" if len(w_leaves) > 1 else where
        if isinstance(w, torch.Tensor):
            assert_tensor(g, w, at, precision)
        elif isinstance(w, float):
            if type(g) is not float:
                raise AssertionError(f"{at}: {type(g).__name__} vs eager float")
            if not (math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-8)
                    or (math.isnan(g) and math.isnan(w))):
                raise AssertionError(f"{at}: {g!r} vs eager {w!r}")
        elif type(g) is not type(w) or g != w:
            raise AssertionError(f"{at}: {g!r} vs eager {w!r}")


def _input_leaves(examples, names):
    out = []
    for i, ex in enumerate(examples):
        for name, t in zip(names, ex):
            if t.requires_grad:
                out.append((f"examples[{i}].{name}", t))
    return out


def _assert_grads(case, got, want, names, precision=None):
    for name, g, w in zip(names, got, want):
        where = f"grad of {name}"
        if (g is None) != (w is None):
            raise AssertionError(f"{where}: {'None' if g is None else 'a tensor'} vs eager "
                                 f"{'None' if w is None else 'a tensor'}")
        if g is not None:
            assert_tensor(g, w, where, precision)


def check(case: Case, fn, *, ctx=contextlib.nullcontext, precision=None):
    """Eager per example vs ``db.batched``: results, then gradients. Returns the eager
    and batched gradients by name. ``precision``: see ``_tol``."""
    eager_ex = case.examples()
    with ctx():
        eager = [fn(ex, case.P) for ex in eager_ex]
    e_leaves = case.params + _input_leaves(eager_ex, case.names)
    e_grads = _grads(eager, [t for _, t in e_leaves])

    batched_ex = case.examples()
    with ctx():
        batched = db.batched(fn)(batched_ex, case.P)
    assert isinstance(batched, list) and len(batched) == len(eager), \
        f"{type(batched).__name__} of {len(batched)} results for {len(eager)} examples"
    for i, (b, e) in enumerate(zip(batched, eager)):
        assert_same(b, e, f"examples[{i}]", precision)
    b_leaves = case.params + _input_leaves(batched_ex, case.names)
    b_grads = _grads(batched, [t for _, t in b_leaves])
    _assert_grads(case, b_grads, e_grads, [n for n, _ in e_leaves], precision)
    return (dict(zip([n for n, _ in e_leaves], e_grads)),
            dict(zip([n for n, _ in b_leaves], b_grads)))


def form_id(o, mn, f):
    return f"{o.name} | {mn.label} | {S.form_source(f)}"


FORMS = list(S.all_forms())
FORM_BY_ID = {form_id(o, mn, f): (o, mn, f) for o, mn, f in FORMS}
assert len(FORM_BY_ID) == len(FORMS), "two forms with the same id"


def _alt_dtype(dtypes):
    for d in (I8, I64, BF16, F16, BOOL, F32):
        if d in dtypes:
            return d
    return None


def _param_cases():
    for o, mn, f in FORMS:
        dtypes = S.dtypes_of(o, mn)
        first = F64 if F64 in dtypes else dtypes[0]
        for d in dict.fromkeys([first, _alt_dtype(dtypes)]):
            if d is not None:
                fid = form_id(o, mn, f)
                yield pytest.param(fid, d, id=f"{fid} [{_dt(d)}]")


# -- the table's own claims (eager only) --------------------------------------------------

@pytest.mark.parametrize("o", S.OPS, ids=[o.name for o in S.OPS])
def test_table_is_sound(o):
    """Every form runs eagerly for every dtype its meaning declares, at the lowest and the
    highest rank, and all forms of a meaning give the same results and gradients."""
    for mn in o.meanings:
        lo, hi = S.rank_range(o, mn)
        dtypes = S.dtypes_of(o, mn)
        for dtype in dtypes:
            # both ends of the rank range for float64 and the other dtype test_form runs;
            # the highest rank for the rest
            both = dtype in (F64, _alt_dtype(dtypes))
            for r in sorted({lo, hi}) if both else [hi]:
                seed = zlib.crc32(f"{o.name}/{mn.label}/{dtype}/{r}".encode())
                case = build_case(o, mn, dtype, Seeded(seed), n_examples=2, grads="all",
                                  rank=r, spread=True)
                first = None
                for f in mn.forms:
                    where = f"{o.name} | {mn.label} | {S.form_source(f)} [{_dt(dtype)}] " \
                            f"{case.info}"
                    exs = case.examples()
                    try:
                        outs = [with_scalar(f)(ex, case.P) for ex in exs]
                    except Exception as err:
                        raise AssertionError(f"eager torch rejects {where}: {err}") from err
                    leaves = case.params + _input_leaves(exs, case.names)
                    grads = _grads(outs, [t for _, t in leaves])
                    if first is None:
                        first = (S.form_source(f), outs, grads)
                        continue
                    for i, (a, b) in enumerate(zip(outs, first[1])):
                        assert_same(a, b, f"{where} vs {first[0]}: examples[{i}]")
                    for (name, _), a, b in zip(leaves, grads, first[2]):
                        assert (a is None) == (b is None), f"{where} vs {first[0]}: {name}"
                        if a is not None:
                            assert_tensor(a, b, f"{where} vs {first[0]}: grad of {name}")


# -- every form once ----------------------------------------------------------------------

@pytest.mark.parametrize("fid,dtype", list(_param_cases()))
def test_form(fid, dtype):
    o, mn, f = FORM_BY_ID[fid]
    lo, hi = S.rank_range(o, mn)
    case = build_case(o, mn, dtype, Seeded(zlib.crc32(f"{fid}/{dtype}".encode())),
                      label=fid, n_examples=3, grads="all", rank=min(hi, max(lo, 2)),
                      spread=True)
    check(case, with_scalar(f))


# -- hypothesis over the table --------------------------------------------------------------

_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def cases(draw, grads=None):
    ch = Draws(draw(st.data()))
    fid = ch.pick(sorted(FORM_BY_ID), "form")
    o, mn, f = FORM_BY_ID[fid]
    dtype = ch.pick(S.dtypes_of(o, mn), "dtype")
    case = build_case(o, mn, dtype, ch, label=fid, grads=grads)
    scalar = dtype.is_floating_point and ch.bool("scalar")
    return case, (with_scalar(f) if scalar else plain(f))


@settings(max_examples=40, **_SETTINGS)
@given(drawn=cases())
def test_fuzz(drawn):
    case, fn = drawn
    note(case.describe())
    check(case, fn)


# -- 0-d per-example tensors ----------------------------------------------------------------

_ZERO_D_OP = S.op("0-d", "0-d", S.m("0-d"), inputs={"x": T("n")},
                  shared={"s": T(""), "W1": T("b 1")})


@pytest.mark.parametrize("source", ["x.sum()", "the example"])
@pytest.mark.parametrize("k", range(len(S.ZERO_D)),
                         ids=[S.form_source(f) for f in S.ZERO_D])
def test_zero_d(k, source):
    f = S.ZERO_D[k]
    o = _ZERO_D_OP
    if source == "x.sum()":
        def fn(ex, P):
            (x,) = ex
            return f(x.sum(), x, P)
    else:
        o = S.op("0-d", "0-d", S.m("0-d"), inputs={"s": T(""), "x": T("n")},
                 shared=_ZERO_D_OP.shared)

        def fn(ex, P):
            s, x = ex
            return f(s, x, P)
    case = build_case(o, o.meanings[0], F64, Seeded(k), label=S.form_source(f),
                      n_examples=3, grads="all", spread=True)
    check(case, fn)


# -- mixed dtypes with 0-d operands -----------------------------------------------------------

@pytest.mark.parametrize("k", range(len(S.MIXED_DTYPES)),
                         ids=[label for label, _, _ in S.MIXED_DTYPES])
def test_mixed_dtypes(k):
    label, dtype, f = S.MIXED_DTYPES[k]
    o = S.op("mixed", "mixed", S.m(label), inputs={"x": T("n a", "big")},
             shared={"h_row": T("1 a", dtype=F16)})
    extra = {"i100": torch.tensor(100), "h05": torch.tensor(0.5, dtype=F16),
             "d05": torch.tensor(0.5, dtype=F64)}
    case = build_case(o, o.meanings[0], dtype, Seeded(k), label=label, n_examples=3,
                      grads="all", spread=True, extra_shared=extra)
    check(case, plain(f))


# -- autocast ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", range(len(S.AUTOCAST)), ids=[a[0] for a in S.AUTOCAST])
def test_autocast(k):
    label, inputs, shared, f = S.AUTOCAST[k]
    o = S.op(label, "autocast", S.m(label), inputs=inputs, shared=shared, ranks=(1, 2),
             sizes=(2, 4))
    case = build_case(o, o.meanings[0], F32, Seeded(k), label=label, n_examples=3,
                      grads="all", spread=True)
    # bfloat16 is the precision of the computation in both runs (float32 gradients of
    # bfloat16 products included), so values compare at bfloat16's precision
    check(case, with_scalar(f), ctx=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
          precision=BF16)


# -- containers -------------------------------------------------------------------------

@pytest.mark.parametrize("k", range(len(S.CONTAINERS)), ids=[c[0] for c in S.CONTAINERS])
def test_containers(k):
    label, f = S.CONTAINERS[k]
    o = S.op(label, "containers", S.m(label), inputs={"x": T("n a")},
             shared={"w": T("a")}, sizes=(2, 4))
    case = build_case(o, o.meanings[0], F64, Seeded(k), label=label, n_examples=3,
                      grads="all", spread=True)
    check(case, plain(f))


# -- grad is None -------------------------------------------------------------------------

@pytest.mark.parametrize("k", range(len(S.GRAD_NONE)), ids=[g[0] for g in S.GRAD_NONE])
def test_grad_none(k):
    label, f = S.GRAD_NONE[k]
    o = S.op(label, "grad None", S.m(label), inputs={"x": T("a")},
             shared={"W": T("a a"), "table": T("a a")}, sizes=(2, 4))
    case = build_case(o, o.meanings[0], F64, Seeded(k), label=label, n_examples=3,
                      grads="all", spread=True)
    eager, batched = check(case, plain(f))
    assert eager["P.W"] is None, "the table's claim: eager leaves P.W.grad None"
    assert batched["P.W"] is None


# -- two threads --------------------------------------------------------------------------

def _run_batched_grads(case, fn):
    exs = case.examples()
    outs = db.batched(fn)(exs, case.P)
    leaves = case.params + _input_leaves(exs, case.names)
    return outs, _grads(outs, [t for _, t in leaves], backward=False)


# every example's inputs require grad (or none do): a pattern of some is test_fuzz's
@settings(max_examples=10, **_SETTINGS)
@given(drawn=cases(grads="all"))
def test_two_threads(drawn):
    case, fn = drawn
    note(case.describe())
    exs = case.examples()
    eager = [fn(ex, case.P) for ex in exs]
    leaves = case.params + _input_leaves(exs, case.names)
    e_grads = _grads(eager, [t for _, t in leaves], backward=False)
    names = [n for n, _ in leaves]
    barrier = threading.Barrier(2)
    results = [None, None]

    def work(k):
        try:
            barrier.wait(timeout=30)
            results[k] = _run_batched_grads(case, fn)
        except BaseException as err:      # reported in the main thread
            results[k] = err

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for k, r in enumerate(results):
        if isinstance(r, BaseException):
            raise AssertionError(f"thread {k}: {type(r).__name__}: {r}") from r
        assert r is not None, f"thread {k} did not finish"
        outs, grads = r
        assert len(outs) == len(eager)
        for i, (b, e) in enumerate(zip(outs, eager)):
            assert_same(b, e, f"thread {k}: examples[{i}]")
        _assert_grads(case, grads, e_grads, [f"thread {k}: {n}" for n in names])
