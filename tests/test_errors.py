"""Errors name the example and the user's line, literally; a failed run leaves no state.

Lines are found through marker comments (``# <-name``) in this file, so the expected
``test_errors.py:LINE`` follows edits to the file.
"""
from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch import blocks
from dynbatch.errors import (
    BlockError,
    DynbatchError,
    ExecuteError,
    MixedRunError,
    Site,
    TraceError,
    UnsupportedError,
)
from dynbatch.lazy import current

ORIGINAL_MODULE_CALL = nn.Module.__call__
FILE = os.path.basename(__file__)
with open(__file__) as _f:
    _SOURCE = _f.read().splitlines()


def line_of(marker: str) -> int:
    hits = [i + 1 for i, text in enumerate(_SOURCE)
            if text.rstrip().endswith(f"# <-{marker}")]
    assert len(hits) == 1, f"marker {marker!r}: {hits}"
    return hits[0]


def assert_names(message: str, example: int, marker: str) -> None:
    assert f"examples[{example}]" in message, message
    assert f"{FILE}:{line_of(marker)}" in message, message
    # the offending source line itself is quoted
    assert _SOURCE[line_of(marker) - 1].split("# <-")[0].strip() in message, message


def assert_clean(before) -> None:
    """No state left by a failed run; stats unchanged; the next run works."""
    assert current.tracer is None
    assert nn.Module.__call__ is ORIGINAL_MODULE_CALL
    assert blocks._installed == [0]
    assert torch._C._len_torch_function_stack() == 0
    assert gc.isenabled()
    assert db.stats() is before
    xs = [torch.randn(3), torch.randn(3)]
    lin = nn.Linear(3, 2)
    outs = db.batched(lambda x, lin: torch.tanh(lin(x)))(xs, lin)
    assert all(type(o) is torch.Tensor for o in outs)
    for o, x in zip(outs, xs):
        torch.testing.assert_close(o, torch.tanh(lin(x)), atol=1e-8, rtol=0)
    assert db.stats() is not before and db.stats().examples == 2
    assert current.tracer is None and torch._C._len_torch_function_stack() == 0
    assert nn.Module.__call__ is ORIGINAL_MODULE_CALL


@contextlib.contextmanager
def failing_run(exc_type):
    """``pytest.raises(exc_type)``, then: no state left behind and stats() unchanged."""
    db.batched(lambda x: x * 2)([torch.ones(1)])      # stats() is now a known object
    before = db.stats()
    with pytest.raises(exc_type) as info:
        yield info
    assert_clean(before)


# -- shape errors at trace time -------------------------------------------------------------

W24 = torch.randn(2, 4)


def cat_fn(x):
    y = torch.tanh(x)
    return torch.cat([y.unsqueeze(0), W24])  # <-cat-mismatch


@pytest.mark.parametrize("strategy", ["agenda", "depth"])
def test_shape_mismatch_names_example_and_line(strategy):
    examples = [torch.randn(4), torch.randn(4), torch.randn(3), torch.randn(4)]
    with failing_run(TraceError) as info:
        db.batched(cat_fn, strategy=strategy)(examples)
    assert isinstance(info.value, DynbatchError) and isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert_names(message, 2, "cat-mismatch")
    assert "torch.cat" in message
    for other in (0, 1, 3):
        assert f"examples[{other}]" not in message


def linear_fn(x, lin):
    return lin(x)  # <-linear-mismatch


def test_module_shape_mismatch_names_example_and_line():
    lin = nn.Linear(4, 2)
    examples = [torch.randn(4), torch.randn(4), torch.randn(5)]
    with failing_run(TraceError) as info:
        db.batched(linear_fn)(examples, lin)
    assert_names(str(info.value), 2, "linear-mismatch")


@db.block
def bad_cell(x, w):
    return torch.cat([x, w], dim=1)  # <-block-mismatch


def block_fn(x, w):
    return bad_cell(x, w)


def test_shape_mismatch_inside_a_block_names_example_and_line():
    w = torch.randn(2, 3)
    examples = [torch.randn(2, 1), torch.randn(2, 1), torch.randn(4, 1)]
    with failing_run(DynbatchError) as info:
        db.batched(block_fn)(examples, w)
    assert isinstance(info.value, (TraceError, BlockError))
    assert_names(str(info.value), 2, "block-mismatch")


# -- value errors at execution time ---------------------------------------------------------

TABLE = torch.randn(5, 3)


def lookup(i):
    return TABLE[torch.tensor(i)] * 2  # <-bad-index


@pytest.mark.parametrize("strategy", ["agenda", "depth"])
def test_execution_error_names_example_and_line(strategy):
    # shapes are fine, so tracing succeeds; the batched lookup fails and dynbatch reruns it
    # per example to name the culprit
    with failing_run(ExecuteError) as info:
        db.batched(lookup, strategy=strategy)([0, 1, 7, 2])
    assert_names(str(info.value), 2, "bad-index")
    assert isinstance(info.value.__cause__, (IndexError, RuntimeError))


def factor(m):
    return torch.linalg.cholesky(m * 2)  # <-not-pd


@pytest.mark.filterwarnings("ignore:dynbatch ran torch.linalg_cholesky one example at a time")
@pytest.mark.parametrize("strategy", ["agenda", "depth"])
def test_execution_error_in_plain_nodes_names_example_and_line(strategy):
    # m * 2 and cholesky(.) keep no arguments of their own (NOTE [plain nodes]): naming the
    # culprit reruns them per example from their inputs and their signature's template
    good = torch.eye(2, dtype=torch.float64)
    with failing_run(ExecuteError) as info:
        db.batched(factor, strategy=strategy)([good, good, -good, good])
    assert_names(str(info.value), 2, "not-pd")
    out = db.batched(factor, strategy=strategy)([good, 3 * good])
    assert torch.allclose(out[1], factor(3 * good))


def lookup_after_a_read(i):
    if torch.tanh(torch.tensor(float(i))).item() > -2:   # every example stops here once
        return TABLE[torch.tensor(i)] * 2  # <-index-after-read


@pytest.mark.parametrize("strategy", ["agenda", "depth"])
def test_an_error_after_a_read_names_the_example_that_recorded_it(strategy):
    # after a read the examples resume in turn (NOTE [reads]); each node still belongs to
    # the example that recorded it, though nodes no longer keep the index (Run.example_of)
    with failing_run(ExecuteError) as info:
        db.batched(lookup_after_a_read, strategy=strategy)([0, 1, 2, 7, 3])
    assert_names(str(info.value), 3, "index-after-read")
    for other in (0, 1, 2, 4):
        assert f"examples[{other}]" not in str(info.value)


@db.block
def lookup_block(i):
    return TABLE[i] * 2


EMBED = nn.Embedding(5, 3)


def call_blocks(i):
    x = lookup_block(  # <-block-call
        torch.tensor(i))
    return x + EMBED(torch.tensor(i))  # <-module-block-call


@pytest.mark.parametrize("strategy", ["agenda", "depth"])
@pytest.mark.parametrize("which", ["function", "module"])
def test_execution_error_in_a_block_names_the_line_that_called_it(strategy, which):
    # a block node keeps the line of its call (a call spanning two lines: its first); a
    # module block fails first when the function block is given a good index
    if which == "module":
        global TABLE
        table, TABLE = TABLE, torch.randn(10, 3)
    try:
        with failing_run(ExecuteError) as info:
            db.batched(call_blocks, strategy=strategy)([0, 1, 7, 2])
    finally:
        if which == "module":
            TABLE = table
    assert_names(str(info.value), 2, "block-call" if which == "function"
                 else "module-block-call")


@pytest.mark.parametrize("read", [False, True], ids=["at-exit", "at-a-read"])
def test_execution_error_in_the_scope_names_the_line(read):
    # no example index in the scope form: the message says so, and still names the line
    with failing_run(ExecuteError) as info:
        with db.autobatch():
            ys = [lookup(i) for i in (1, 9)]
            if read:
                ys[0].sum().item()
    message = str(info.value)
    assert "the autobatch scope" in message, message
    assert f"{FILE}:{line_of('bad-index')}" in message, message


# -- the user's own exceptions --------------------------------------------------------------

def boom_fn(x):
    if x.shape[0] == 2:
        raise ValueError("boom")
    return x * 2


def test_user_exception_propagates_unchanged():
    examples = [torch.randn(3), torch.randn(2), torch.randn(3)]
    with failing_run(ValueError) as info:
        db.batched(boom_fn)(examples)
    assert type(info.value) is ValueError
    assert str(info.value) == "boom"
    assert info.value.args == ("boom",)
    assert any("examples[1]" in n for n in getattr(info.value, "__notes__", []))


class BoomModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        raise KeyError("inside a module")


def test_user_exception_inside_a_module_restores_module_call():
    m = BoomModule()
    with failing_run(KeyError):
        db.batched(lambda x, m: m(x))([torch.randn(3)], m)


def test_user_exception_inside_the_scope():
    with failing_run(ZeroDivisionError):
        with db.autobatch():
            y = torch.tensor([1.0]) * 2
            1 / 0
    # a lazy tensor of the failed run never gets a value
    with failing_run(MixedRunError):
        y.value


# -- empty and non-sequence minibatches -----------------------------------------------------

def test_empty_minibatch():
    before = db.stats()
    assert db.batched(cat_fn)([]) == []
    assert db.batched(cat_fn)(()) == []
    assert_clean(before)


@pytest.mark.parametrize("bad", [7, (x for x in [torch.ones(2)]), iter([torch.ones(2)])],
                         ids=["int", "generator", "iterator"])
def test_non_sequence_minibatch(bad):
    with failing_run(TypeError):
        db.batched(lambda x: x * 2)(bad)


# -- lazy tensors of two runs ---------------------------------------------------------------

def test_mixing_two_scopes_raises():
    with db.autobatch():
        old = torch.tensor([1.0, 2.0]) * 2
    assert torch.equal(old.value, torch.tensor([2.0, 4.0]))     # fine after its scope
    with failing_run(MixedRunError):
        with db.autobatch():
            torch.tensor([1.0, 1.0]) + old
    with failing_run(MixedRunError):
        with db.autobatch():
            old.sum()


def test_mixing_two_batched_runs_raises():
    stash = []

    @db.batched
    def keep(x):
        y = x * 2
        stash.append(y)
        return y

    @db.batched
    def use(x):
        return x + stash[0]

    keep([torch.ones(2)])
    with failing_run(MixedRunError):
        use([torch.ones(2), torch.zeros(2)])


# -- in-place ops on per-example tensors ----------------------------------------------------

def inplace_method(x):
    y = x * 2
    y.add_(1)  # <-add_
    return y


def inplace_zero(x):
    y = x * 2
    y.zero_()  # <-zero_
    return y


def setitem(x):
    y = x * 2
    y[0] = 1.0  # <-setitem
    return y


def setitem_slice(x):
    y = torch.zeros(3)
    y[1:] = x[:2]  # <-setitem-slice
    return y


def torch_inplace(x):
    y = x * 2
    torch.relu_(y)  # <-torch-relu_
    return y


def functional_inplace(x):
    y = x * 2
    F.relu(y, inplace=True)  # <-F-relu-inplace
    return y


@pytest.mark.parametrize("fn", [inplace_method, inplace_zero, setitem, setitem_slice,
                                torch_inplace, functional_inplace])
def test_inplace_on_a_per_example_tensor_is_recorded_out_of_place(fn):
    # the lazy tensor then stands for the mutated tensor, as the tensor object would
    xs = [torch.randn(3), torch.randn(3), torch.randn(3)]
    for o, x in zip(db.batched(fn)(xs), xs):
        torch.testing.assert_close(o, fn(x), atol=1e-8, rtol=0)
    assert db.stats().fallbacks == 0


def inplace_on_a_viewed_tensor(x):
    y = x * 2
    head = y[:2]
    y.add_(1)  # <-viewed
    return head


def inplace_on_a_view(x):
    y = x * 2
    head = y[:2]
    head.mul_(3)  # <-view
    return y


@pytest.mark.parametrize("fn, marker", [(inplace_on_a_viewed_tensor, "viewed"),
                                        (inplace_on_a_view, "view")])
def test_inplace_where_eager_would_also_change_another_tensor_is_refused(fn, marker):
    # a view shares storage: eager's mutation shows through it, which a recording cannot
    with failing_run(UnsupportedError) as info:
        db.batched(fn)([torch.randn(3), torch.randn(3)])
    assert_names(str(info.value), 0, marker)


def test_augmented_assignment_is_fine():
    # `x += 1` only rebinds the name: allowed, and computed out of place
    def fn(x):
        y = x * 2
        y += 1
        y *= 3
        return y

    xs = [torch.randn(3), torch.randn(3)]
    for o, x in zip(db.batched(fn)(xs), xs):
        torch.testing.assert_close(o, (x * 2 + 1) * 3, atol=1e-8, rtol=0)


@pytest.mark.parametrize("strategy", ["agenda", "depth"])
def test_execution_error_names_the_first_failing_example_whatever_the_row_order(strategy):
    # two examples fail; the message names the first of them, examples[1], whichever row
    # of the batch the executor gave it (NOTE [row order])
    with failing_run(ExecuteError) as info:
        db.batched(lookup, strategy=strategy)([0, 8, 1, 9, 2])
    assert_names(str(info.value), 1, "bad-index")
    assert "examples[3]" not in str(info.value)


FRESH_USER_FILE = """\
import torch


def ops(x):
    a = x * 2                      # a Tensor method
    b = torch.tanh(a)              # a hot function (patched while a run records)
    return torch.erf(b)            # a torch function reaching the mode
"""


@pytest.mark.parametrize("route", ["method", "hot", "mode"])
def test_a_user_file_seen_for_the_first_time_gets_its_own_line(tmp_path, monkeypatch, route):
    # The recorder looks a node's line up by file name; a file not seen before must be
    # walked to, not skipped for its caller (this file, already known as the user's).
    import importlib
    name = f"fresh_user_{route}"
    (tmp_path / f"{name}.py").write_text(FRESH_USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = importlib.import_module(name)
    first = {"method": 5, "hot": 6, "mode": 7}[route]
    with db.autobatch() as run:
        x = torch.tensor([0.5, -1.0, 2.0])     # per-example data: a lazy tensor
        if route == "method":
            x * 3                       # this file is known as the user's before ...
        fresh.ops(x)                    # ... the fresh one is met
        sites = [Site.of(n.site) for n in run.graph.nodes]
    lines = [(os.path.basename(s.filename), s.lineno) for s in sites if s is not None]
    assert (f"{name}.py", first) in lines, lines
    assert [line for f, line in lines if f == f"{name}.py"] == [5, 6, 7], lines
