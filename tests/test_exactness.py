"""Exactness against eager PyTorch: one test (or a parametrized family) per class of silent
divergence an outside fuzzer found.

The oracle is the library's promise: a function written for ONE example, run under
``@db.batched`` on a list of examples, returns what the plain per-example eager code
returns, example by example: every output's value, shape, dtype and ``requires_grad``, the
same containers (types and key order), the same Python values, and after ``backward`` the
same gradient for every parameter, including ``grad is None`` where eager leaves it None.
``check`` below runs the eager side itself, in the test, on the same inputs and weights, so
no expectation is hard-coded; the batched side uses only the public API (``db.batched``,
``db.block``, ``db.stats``). Values are compared in float64 (conftest's autouse fixture
sets the default dtype; tests that need float32, float16, bfloat16 or int8 say so
explicitly). Minibatches hold at least 3 examples with different values (and, where it
matters, different shapes), so mixing rows across examples would show.

Each test's name starts with ``test_cN_``: N is the class number of the report
(1 positional arguments, 2 names and aliases, 3 defaults, 4 0-d tensors with dim=-1,
5 dtypes, 6 data-dependent shapes, 7 grad modes inside a block, 8 None vs zero gradients,
9 tensor properties, 10 side effects of shape inference, 11 state missing from cached
signatures, 12 result containers, 13 threads, 14 odds and ends, 15 error and warning sites).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import os
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db

ATOL, RTOL = 1e-8, 1e-6
THIS_FILE = os.path.abspath(__file__)
THIS_NAME = os.path.basename(__file__)
_DYNBATCH_DIR = os.path.dirname(os.path.abspath(db.__file__))


# -- the oracle ------------------------------------------------------------------------------

def same(actual, expected, where="result", atol=ATOL, rtol=RTOL):
    """``actual`` (batched) is what eager gave: same container types and keys, tensors of the
    same shape, dtype and requires_grad with equal values, equal Python values."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), \
            f"{where}: {type(actual).__name__}, eager gave a torch.Tensor"
        assert actual.shape == expected.shape, \
            f"{where}: shape {tuple(actual.shape)}, eager {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, \
            f"{where}: dtype {actual.dtype}, eager {expected.dtype}"
        assert actual.requires_grad == expected.requires_grad, \
            f"{where}: requires_grad {actual.requires_grad}, eager {expected.requires_grad}"
        a, e = actual.detach(), expected.detach()
        if e.dtype.is_floating_point or e.dtype.is_complex:
            a, e = a.to(torch.float64), e.to(torch.float64)
            diff = (a - e).abs()
            bad = ~(diff <= atol + rtol * e.abs()) & ~(torch.isnan(a) & torch.isnan(e))
            assert not bool(bad.any()), \
                f"{where}: max abs diff {diff.max().item():.3e}\n{actual}\neager\n{expected}"
        else:
            assert torch.equal(a, e), f"{where}: {actual}, eager {expected}"
        return
    assert type(actual) is type(expected), \
        f"{where}: {type(actual).__name__}, eager gave {type(expected).__name__}"
    if dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            same(getattr(actual, f.name), getattr(expected, f.name), f"{where}.{f.name}",
                 atol, rtol)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), \
            f"{where}: keys {list(actual)}, eager {list(expected)}"
        for k in expected:
            same(actual[k], expected[k], f"{where}[{k!r}]", atol, rtol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), \
            f"{where}: {len(actual)} entries, eager {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            same(a, e, f"{where}[{i}]", atol, rtol)
    else:
        assert actual == expected, f"{where}: {actual!r}, eager {expected!r}"


def _tensors(structure):
    if isinstance(structure, torch.Tensor):
        yield structure
    elif dataclasses.is_dataclass(structure) and not isinstance(structure, type):
        for f in dataclasses.fields(structure):
            yield from _tensors(getattr(structure, f.name))
    elif isinstance(structure, dict):
        for v in structure.values():
            yield from _tensors(v)
    elif isinstance(structure, (list, tuple)):
        for v in structure:
            yield from _tensors(v)


def grads_of(params, outputs):
    """The gradient of every param (None kept) of the sum of every differentiable output."""
    for p in params:
        p.grad = None
    terms = [t.sum().to(torch.float64) for t in _tensors(outputs)
             if t.requires_grad and t.dtype.is_floating_point]
    if terms:
        torch.stack(terms).sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def same_grads(actual, expected, params, atol=ATOL, rtol=RTOL):
    for k, (a, e) in enumerate(zip(actual, expected)):
        name = f"grad of parameter {k} {tuple(params[k].shape)}"
        assert (a is None) == (e is None), \
            f"{name}: {'None' if a is None else 'a tensor'} batched, " \
            f"{'None' if e is None else 'a tensor'} in eager"
        if e is not None:
            same(a, e, name, atol, rtol)


def check(fn, examples, *args, params=(), atol=ATOL, rtol=RTOL, strategy="agenda"):
    """Run ``fn(example, *args)`` eagerly per example and under ``db.batched``; compare
    every output and every gradient of ``params``. Returns (batched outputs, stats)."""
    params = list(params)
    eager = [fn(x, *args) for x in examples]
    eager_grads = grads_of(params, eager)
    batched = db.batched(fn, strategy=strategy)(examples, *args)
    stats = db.stats()
    assert type(batched) is list and len(batched) == len(examples)
    for i, (b, e) in enumerate(zip(batched, eager)):
        same(b, e, f"examples[{i}]", atol, rtol)
    same_grads(grads_of(params, batched), eager_grads, params, atol, rtol)
    return batched, stats


def matrices(shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) * (i + 1) for i, s in enumerate(shapes)]


MIXED_2D = [(3, 4), (3, 4), (3, 4), (2, 4), (3, 4)]    # one example of another shape


def row_param(seed=1):
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(4))


# -- 1: positional arguments read as the wrong parameter -------------------------------------

POSITIONAL = {
    "norm(2, dim=-1)": lambda h: h.norm(2, dim=-1),
    "norm(1, -1)": lambda h: h.norm(1, -1),
    "std(False)": lambda h: h.std(False),
    "var(False)": lambda h: h.var(False),
}


@pytest.mark.parametrize("name", list(POSITIONAL))
def test_c1_positional_arguments(name):
    op = POSITIONAL[name]
    w = row_param()
    check(lambda x, w: op(x * w), matrices(MIXED_2D), w, params=[w])


# -- 2: parameter names and numpy-style aliases ----------------------------------------------

ALIASES = {
    "roll(x, 1, dims=0)": lambda h: torch.roll(h, 1, dims=0),
    "cumsum(x, axis=0)": lambda h: torch.cumsum(h, axis=0),
    # values and indices as a plain tuple: the namedtuple container is class 12's test
    "x.sort(axis=0)": lambda h: (h.sort(axis=0).values, h.sort(axis=0).indices),
    "sum(dim=0, keepdims=True)": lambda h: torch.sum(h, dim=0, keepdims=True),
    "x.mean(axis=0, keepdims=True)": lambda h: h.mean(axis=0, keepdims=True),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_c2_keyword_names_and_aliases(name):
    op = ALIASES[name]
    w = row_param()
    check(lambda x, w: op(x * w), matrices(MIXED_2D), w, params=[w])


# -- 3: defaults -----------------------------------------------------------------------------

DEFAULTS = {
    "F.normalize(x)": lambda h: F.normalize(h),            # dim=1 of the example
    "roll(x, 1)": lambda h: torch.roll(h, 1),               # rolls the flattened example
    "x.flatten()": lambda h: h.flatten(),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_c3_defaults(name):
    op = DEFAULTS[name]
    w = row_param()
    check(lambda x, w: op(x * w), matrices(MIXED_2D), w, params=[w])


# -- 4: 0-d per-example tensors with dim=-1 ---------------------------------------------------

ZERO_D = {
    "softmax(-1)": lambda s: s.softmax(-1),
    "cumsum(-1)": lambda s: s.cumsum(-1),
    "flip(-1)": lambda s: s.flip(-1),
    "sort(-1)": lambda s: (s.sort(-1).values, s.sort(-1).indices),
    "logsumexp(s, -1)": lambda s: torch.logsumexp(s, -1),
    "log_softmax(-1)": lambda s: s.log_softmax(-1),
}


@pytest.mark.parametrize("name", list(ZERO_D))
def test_c4_zero_dim_with_dim_minus_one(name):
    op = ZERO_D[name]
    w = row_param()
    check(lambda x, w: op((x * w).sum()), matrices(MIXED_2D), w, params=[w])


# -- 5: dtypes (type promotion as eager does it) ---------------------------------------------

def test_c5_int8_plus_zero_dim_int64_wraps_in_int8():
    xs = [torch.tensor([10, 50, 100], dtype=torch.int8),
          torch.tensor([-100, 27, 28], dtype=torch.int8),
          torch.tensor([127, -128, 0], dtype=torch.int8)]
    out, _ = check(lambda x: x + torch.tensor(100), xs)
    assert out[0].dtype == torch.int8


def test_c5_half_times_zero_dim_float_stays_half():
    xs = matrices([(4,), (4,), (4,)], dtype=torch.float16)
    out, _ = check(lambda x: x * torch.tensor(0.5), xs, atol=1e-3, rtol=1e-3)
    assert out[0].dtype == torch.float16


def test_c5_half_linear_on_half_times_zero_dim():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).to(torch.float16)
    xs = matrices([(4,), (4,), (4,), (4,)], dtype=torch.float16)
    check(lambda x, lin: lin(x * torch.tensor(0.5)), xs, lin, params=list(lin.parameters()),
          atol=2e-3, rtol=2e-3)


CROSS_ENTROPY = {
    "logits (C,)": lambda logits, t: F.cross_entropy(logits, torch.tensor(t)),
    "logits (1, C)": lambda logits, t: F.cross_entropy(logits.unsqueeze(0), torch.tensor([t])),
}


@pytest.mark.parametrize("name", list(CROSS_ENTROPY))
def test_c5_cross_entropy_under_bfloat16_autocast_is_float32(name):
    ce = CROSS_ENTROPY[name]
    torch.manual_seed(0)
    lin = nn.Linear(4, 5, dtype=torch.float32)
    xs = [(x, t) for x, t in zip(matrices([(4,)] * 4, dtype=torch.float32), [0, 3, 1, 4])]

    def loss(ex, lin):
        x, t = ex
        return ce(lin(x), t)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = [loss(ex, lin) for ex in xs]
        batched = db.batched(loss)(xs, lin)
    assert eager[0].dtype == torch.float32          # the eager side, checked here
    for i, (b, e) in enumerate(zip(batched, eager)):
        same(b, e, f"examples[{i}]", atol=5e-2, rtol=5e-2)


# -- 6: data-dependent shapes (run per example on real values; must equal eager) -------------

SIGNS = [torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]),
         torch.tensor([-1.5, -2.5, 0.5, 4.0, 0.0]),
         torch.tensor([2.0, 1.0, 3.0, 0.25, 6.0]),
         torch.tensor([-3.0, 0.0, -1.0, -2.0, 7.0])]   # 3, 2, 5 and 1 positives


def _len_nonzero(h):
    n = len((h > 0).nonzero())          # a Python int
    return h.sum() * n, torch.ones(n)


DATA_DEPENDENT = {
    "torch.where(c)[0]": lambda h: (torch.where(h > 0)[0], h[torch.where(h > 0)[0]]),
    "len(x.nonzero()) as int": _len_nonzero,
    "x.nonzero()": lambda h: h.nonzero(),
    "x.unique()": lambda h: (h > 0).long().cumsum(0).unique(),
    "x.masked_select(m)": lambda h: h.masked_select(h > 0),
    "x[x > 0]": lambda h: h[h > 0],
    "F.one_hot(t)": lambda h: F.one_hot((h > 0).long().cumsum(0)),
}


@pytest.mark.parametrize("name", list(DATA_DEPENDENT))
def test_c6_data_dependent_shapes(name):
    op = DATA_DEPENDENT[name]
    w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
    try:
        check(lambda x, w: op(x * w), SIGNS, w, params=[w])
    except Exception as err:     # if it fails, at least it must not name dynbatch internals
        assert "dynbatch/" not in str(err) and "LazyTensor" not in str(err), str(err)
        raise


# -- 7: grad modes inside a block ------------------------------------------------------------

@db.block
def _half_frozen_cell(x, a, b):
    h = torch.tanh(a @ x)
    with torch.no_grad():
        gate = torch.sigmoid(b @ x)        # no gradient may reach b
    return h * gate, gate


def test_c7_no_grad_inside_block():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 4))
    out, _ = check(lambda x, a, b: _half_frozen_cell(x, a, b), matrices([(4,)] * 4), a, b,
                   params=[a, b])
    assert b.grad is None


@db.block
class _FrozenGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            gate = torch.sigmoid(self.b(x))
        return torch.tanh(self.a(x)) * gate


def test_c7_no_grad_inside_block_module():
    torch.manual_seed(0)
    cell = _FrozenGate()
    check(lambda x, cell: cell(x).sum(), matrices([(4,)] * 4), cell,
          params=list(cell.parameters()))


# -- 8: None vs zero gradients ---------------------------------------------------------------

# The two simple shapes first (main gets them right today); then the variant that fails.
def test_c8_parameter_reached_only_through_argmax():
    torch.manual_seed(0)
    W, P = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 2))

    def f(x, W, P):
        return P[(W @ x).argmax()].sum()

    check(f, matrices([(4,)] * 4), W, P, params=[W, P])
    assert W.grad is None


def test_c8_value_computed_and_never_used():
    torch.manual_seed(0)
    V, P = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4, 2))

    def f(x, V, P):
        unused = torch.tanh(V @ x)     # noqa: F841
        return (P.T @ x).sum()

    check(f, matrices([(4,)] * 4), V, P, params=[V, P])


def test_c8_argmax_only_path_batched_with_a_differentiable_path():
    """Mechanism: examples 0 and 2 compute ``tanh(W @ x)`` and read it only through
    ``argmax``; examples 1 and 3 compute ``tanh(V @ x)`` and sum it. Both tanh nodes have
    the same signature, so they run as ONE batched tanh over ``cat(W@x rows, V@x rows)``.
    In backward, the gradient of the batched tanh flows into the cat, whose backward hands
    the W@x rows a zero gradient, and ``mm``'s backward turns that into ``W.grad = zeros``.
    Eager never connects W to the loss: ``W.grad is None``."""
    torch.manual_seed(0)
    W, V = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 4))
    P = nn.Parameter(torch.randn(3, 2))

    def f(ex, W, V, P):
        x, k = ex
        if k % 2 == 0:
            y = torch.tanh(W @ x)
            return P[y.argmax()].sum()
        y = torch.tanh(V @ x)
        return (y * 2 + 1).sum()          # as long a path as the other branch: same batch

    xs = list(zip(matrices([(4,)] * 4), range(4)))
    for strategy in ("agenda", "depth"):
        check(f, xs, W, V, P, params=[W, V, P], strategy=strategy)


def test_c8_requires_grad_leaks_through_a_shared_batch():
    """Same mechanism, seen in the outputs: an example whose tanh reads only its own data
    (no parameter) shares a batched tanh with examples that read ``V @ x``; its output must
    still have ``requires_grad == False``, as in eager."""
    torch.manual_seed(0)
    V = nn.Parameter(torch.randn(3, 4))

    def f(x, V):
        y = torch.tanh(x[:3]) if x[0] > 0 else torch.tanh(V @ x)
        return y.sum()

    xs = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([-1.0, 0.5, 0.25, 2.0]),
          torch.tensor([0.5, -1.0, 2.0, 1.0]), torch.tensor([-2.0, 1.0, -1.0, 0.5])]
    check(f, xs, V, params=[V])


# -- 9: tensor properties inside per-example code --------------------------------------------

PROPERTIES = {
    "h.requires_grad": lambda x, h: h.requires_grad,
    "x.requires_grad": lambda x, h: x.requires_grad,
    "h.is_leaf": lambda x, h: h.is_leaf,
    "x.is_leaf": lambda x, h: x.is_leaf,
    "h.grad_fn is None": lambda x, h: h.grad_fn is None,
    "x.grad_fn is None": lambda x, h: x.grad_fn is None,
}


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name", list(PROPERTIES))
def test_c9_tensor_properties(name, grad_enabled):
    prop = PROPERTIES[name]
    w = row_param()

    def f(x, w):
        h = x * w
        flag = prop(x, h)
        assert type(flag) is bool
        # branch on it, and return it: a wrong answer changes both
        return (h.sum() * 2 if flag else h.sum() * 3), flag

    with torch.set_grad_enabled(grad_enabled):
        check(f, matrices([(4,)] * 3), w, params=[w])


# -- 10: side effects of shape inference -----------------------------------------------------

def test_c10_embedding_max_norm_renorms_only_looked_up_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, max_norm=1.0)
    with torch.no_grad():
        emb.weight.mul_(3.0)               # every row's norm above max_norm
    eager_emb, batched_emb = copy.deepcopy(emb), copy.deepcopy(emb)
    ids = [[1, 2], [2, 5], [7], [5, 1]]    # rows 0, 3, 4, 6, 8, 9 are never looked up

    def f(ex, emb):
        return emb(torch.tensor(ex)).sum(0)

    eager = [f(ex, eager_emb) for ex in ids]
    eager_grads = grads_of([eager_emb.weight], eager)
    batched = db.batched(f)(ids, batched_emb)
    for i, (b, e) in enumerate(zip(batched, eager)):
        same(b, e, f"examples[{i}]")
    same_grads(grads_of([batched_emb.weight], batched), eager_grads, [batched_emb.weight])
    same(batched_emb.weight.detach(), eager_emb.weight.detach(), "the embedding table")
    untouched = [0, 3, 4, 6, 8, 9]
    assert torch.equal(batched_emb.weight.detach()[untouched], emb.weight.detach()[untouched])


class _Scale(nn.Module):              # not a block: traced op by op
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 2.0, 4))

    def forward(self, x):
        return x * self.w


@pytest.mark.parametrize("kind", ["nn.Linear", "plain module"])
def test_c10_forward_hook_fires_as_in_eager(kind):
    torch.manual_seed(0)
    module = nn.Linear(4, 4) if kind == "nn.Linear" else _Scale()
    calls = []

    def hook(mod, inputs, output):
        calls.append((tuple(inputs[0].shape), tuple(output.shape)))

    module.register_forward_hook(hook)

    def f(x, module):
        return torch.tanh(module(x)).sum()

    xs = matrices([(4,), (4,), (4,), (2, 4)])
    eager = [f(x, module) for x in xs]
    eager_calls, calls[:] = list(calls), []
    batched = db.batched(f)(xs, module)
    for i, (b, e) in enumerate(zip(batched, eager)):
        same(b, e, f"examples[{i}]")
    assert calls == eager_calls, f"hook calls {calls}, eager {eager_calls}"


# -- 11: state missing from cached signatures ------------------------------------------------

def test_c11_autocast_then_no_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, dtype=torch.float32)
    xs = matrices([(4,)] * 3, dtype=torch.float32)

    def f(x, lin):
        y = torch.tanh(lin(x))
        return y, y.dtype                  # the dtype seen while the code runs, too

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = [f(x, lin) for x in xs]
        batched = db.batched(f)(xs, lin)
    for i, (b, e) in enumerate(zip(batched, eager)):
        same(b, e, f"autocast examples[{i}]", atol=2e-2, rtol=2e-2)
    eager = [f(x, lin) for x in xs]
    assert eager[0][0].dtype == torch.float32
    batched = db.batched(f)(xs, lin)           # the same call, outside autocast
    for i, (b, e) in enumerate(zip(batched, eager)):
        same(b, e, f"plain examples[{i}]", atol=1e-5, rtol=1e-5)


def test_c11_autocast_inside_per_example_code():
    """Autocast entered and left inside the per-example code (on for even examples): the
    ops recorded inside must run as eager ran them, though the batch runs later."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(5, 4, dtype=torch.float32))
    lin = nn.Linear(4, 5, dtype=torch.float32)

    def f(ex, W, lin):
        x, k = ex
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=k % 2 == 0):
            y = W @ x
            z = lin(x)
        return y, z, torch.tanh(y).float() * 2

    xs = list(zip(matrices([(4,)] * 4, dtype=torch.float32), range(4)))
    # bfloat16 has 8 bits of mantissa: a batched matmul's backward rounds once where the
    # per-example ones each round, so gradients agree to bfloat16's precision, not float32's
    check(f, xs, W, lin, params=[W, *lin.parameters()], atol=1e-2, rtol=1e-2)


def _with_dtype(y):
    # the dtype the code sees while it runs, and a tensor made from it
    return y, y.dtype, torch.ones(3, dtype=y.dtype) * y


DEFAULT_DTYPE_OPS = {
    "x / 2": lambda x: _with_dtype(x / 2),
    "x * 2.5": lambda x: _with_dtype(x * 2.5),
    "(x * 1.0).mean()": lambda x: _with_dtype((x * 1.0).mean()),
    "torch.tensor(1.5) * x": lambda x: _with_dtype(torch.tensor(1.5) * x),
    "torch.zeros(3) + x": lambda x: _with_dtype(torch.zeros(3) + x),
}


@pytest.mark.parametrize("name", list(DEFAULT_DTYPE_OPS))
def test_c11_default_dtype_changes_between_calls(name):
    op = DEFAULT_DTYPE_OPS[name]
    xs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 7]), torch.tensor([-3, 0, 9])]
    old = torch.get_default_dtype()
    try:
        for dtype in (torch.float64, torch.float32, torch.float64):
            torch.set_default_dtype(dtype)
            out, _ = check(lambda x: op(x), xs)
            assert out[0][0].dtype == dtype
    finally:
        torch.set_default_dtype(old)


# -- 12: result containers -------------------------------------------------------------------

@dataclasses.dataclass
class _Out:
    loss: torch.Tensor
    hidden: torch.Tensor
    label: int


def test_c12_ordered_dict_result():
    w = row_param()

    def f(x, w):
        h = x * w
        return collections.OrderedDict([("z", h.sum()), ("a", torch.tanh(h))])

    out, _ = check(f, matrices([(4,)] * 3), w, params=[w])
    assert type(out[0]) is collections.OrderedDict and list(out[0]) == ["z", "a"]


def test_c12_dataclass_result():
    w = row_param()

    def f(ex, w):
        x, label = ex
        h = x * w
        return _Out(loss=h.sum(), hidden=torch.tanh(h), label=label)

    xs = list(zip(matrices([(4,)] * 3), [3, 1, 2]))
    out, _ = check(f, xs, w, params=[w])
    assert type(out[0]) is _Out and type(out[0].hidden) is torch.Tensor


def test_c12_torch_max_namedtuple_result():
    w = row_param()
    out, _ = check(lambda x, w: torch.max(x * w, 0), matrices(MIXED_2D), w, params=[w])
    eager = torch.max(matrices(MIXED_2D)[1] * w, 0)
    assert type(out[1]) is type(eager)
    same(out[1].values, eager.values, "values")
    same(out[1].indices, eager.indices, "indices")


def test_c12_list_argument_appended_to():
    w = row_param()

    def f(x, w, log):
        h = torch.tanh(x * w)
        log.append(h)
        return h.sum()

    xs = matrices([(4,)] * 3)
    eager_log, batched_log = [], []
    eager = [f(x, w, eager_log) for x in xs]
    batched = db.batched(f)(xs, w, batched_log)
    same(batched, eager, "results")
    assert len(batched_log) == len(eager_log)
    for i, (b, e) in enumerate(zip(batched_log, eager_log)):
        assert type(b) is torch.Tensor, f"log[{i}] is a {type(b).__name__}"
        same(b, e, f"log[{i}]")


# -- 13: threads -----------------------------------------------------------------------------

def test_c13_two_threads_batch_at_once():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(4, 4))

    def one(x, W):
        h = x
        for _ in range(6):                    # long enough for the threads to overlap
            h = torch.tanh(W @ h)
        return h.sum()

    f = db.batched(one)

    batches = {0: matrices([(4,)] * 8, seed=1), 1: matrices([(4,)] * 12, seed=2)}
    with torch.no_grad():
        expected = {t: [one(x, W) for x in xs] for t, xs in batches.items()}
    barrier = threading.Barrier(2)
    results, errors = {0: [], 1: []}, []

    def worker(t):
        try:
            for _ in range(5):
                barrier.wait(timeout=10)
                out = f(batches[t], W)
                s = db.stats()                      # this thread's own last run
                results[t].append((out, s.examples, s.nodes, s.batches))
        except BaseException as err:               # noqa: BLE001 - reported below
            errors.append((t, err))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not errors, errors
    for t, runs in results.items():
        assert len(runs) == 5
        for r, (out, examples, nodes, nbatches) in enumerate(runs):
            for i, (b, e) in enumerate(zip(out, expected[t])):
                assert torch.allclose(b.detach(), e, atol=ATOL, rtol=RTOL), \
                    f"thread {t} run {r} examples[{i}]"
            assert examples == len(batches[t]), \
                f"thread {t} run {r}: db.stats() is not this thread's run " \
                f"(examples={examples}, nodes={nodes}, batches={nbatches})"
            assert nbatches * 4 <= nodes, \
                f"thread {t} run {r}: {nbatches} batches for {nodes} nodes: not batched"


# -- 14: odds and ends -----------------------------------------------------------------------

def test_c14_norm_without_dim():
    w = row_param()
    check(lambda x, w: ((x * w).norm(1), (x * w).norm()), matrices(MIXED_2D), w, params=[w])


def test_c14_fresh_tensor_filled_in_place_one_hot():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 4))

    def f(ex, W):
        x, i = ex
        h = torch.zeros(3)
        h[i] = 1                          # the one-hot idiom, i a Python int
        return (h * (W @ x)).sum(), h

    xs = list(zip(matrices([(4,)] * 4), [2, 0, 1, 2]))
    check(f, xs, W, params=[W])


def test_c14_autograd_grad_inside_per_example_code():
    """A per-example gradient penalty: meaningful, and eager runs it. The batched run must
    give eager's values and gradients, or refuse with a clear error naming this file's
    line (not torch's "does not require grad", which is false: eager's h requires grad)."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 4))

    def f(x, W):
        h = torch.tanh(W @ x)
        (g,) = torch.autograd.grad(h.sum(), W, create_graph=True)   # AUTOGRAD-GRAD-LINE
        return (g ** 2).sum()

    line = _line_of("# AUTOGRAD-GRAD-LINE")
    try:
        check(f, matrices([(4,)] * 3), W, params=[W])
    except AssertionError:
        raise
    except Exception as err:
        text = str(err)
        assert f"{THIS_NAME}:{line}" in text, f"the error does not name {THIS_NAME}:{line}: {text}"
        assert "does not require grad" not in text, f"a misleading error: {text}"


def _line_of(marker: str) -> int:
    with open(THIS_FILE) as src:
        for n, text in enumerate(src, 1):
            if marker in text and "_line_of" not in text:
                return n
    raise LookupError(marker)


# -- 15: warning and error sites -------------------------------------------------------------

def _assert_warnings_name_this_file(caught, line):
    for w in caught:
        site = f"{w.filename}:{w.lineno}"
        assert not os.path.abspath(w.filename).startswith(_DYNBATCH_DIR + os.sep), \
            f"a warning points into dynbatch ({site}): {w.message}"
        assert (os.path.abspath(w.filename) == THIS_FILE and w.lineno == line) or \
            f"{THIS_NAME}:{line}" in str(w.message), \
            f"a warning does not name {THIS_NAME}:{line} ({site}): {w.message}"


def test_c15_vmap_loop_fallback_warning_names_user_line():
    """torch.quantile has no vmap batching rule: vmap runs it one example at a time and
    warns ("performance drop"). The warning must point at the user's line."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(5, 4))

    def f(x, W):
        return torch.quantile(W @ x, 0.3)   # QUANTILE-LINE

    line = _line_of("# QUANTILE-LINE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(f, matrices([(4,)] * 3), W, params=[W])
    _assert_warnings_name_this_file(caught, line)


def test_c15_custom_autograd_function_runs_per_example_with_its_own_backward():
    """A straight-through estimator: round() forward, identity backward. vmap cannot batch
    an autograd.Function without a vmap rule, so it must run per example (warning at the
    user's line) with eager's values, requires_grad and custom gradient."""

    class RoundSTE(torch.autograd.Function):      # a fresh class: warned afresh
        @staticmethod
        def forward(ctx, x):
            return torch.round(x)

        @staticmethod
        def backward(ctx, grad):
            return grad

    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 4))

    def f(x, W):
        q = RoundSTE.apply(W @ x)           # STE-LINE
        return (q * x[:3]).sum()

    line = _line_of("# STE-LINE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(f, matrices([(4,)] * 3), W, params=[W])
    _assert_warnings_name_this_file(caught, line)
