"""The public API of DESIGN.md: batched (function and method forms), autobatch, force,
block, stats. Every result is compared with plain eager PyTorch run one example at a time.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch.graph import input_ids
from dynbatch.testing import assert_close, assert_matches_eager

ATOL, RTOL = 1e-8, 1e-6
H = 6
STRATEGIES = ["agenda", "depth"]


def close(actual, expected, where="result"):
    assert_close(actual, expected, atol=ATOL, rtol=RTOL, where=where)


def vectors(n, size=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]


def grads(params):
    return [p.grad.clone() for p in params]


def zero(params):
    for p in params:
        p.grad = None


def assert_real_tensors(structure):
    if isinstance(structure, (list, tuple)):
        for x in structure:
            assert_real_tensors(x)
    elif isinstance(structure, dict):
        for x in structure.values():
            assert_real_tensors(x)
    else:
        assert type(structure) is torch.Tensor, type(structure)


# -- the function form ---------------------------------------------------------------------

def mlp_loss(x, lin):
    return (torch.tanh(lin(x)) * x).sum()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_function_values_and_grads(strategy):
    torch.manual_seed(0)
    lin = nn.Linear(H, H)
    xs = vectors(7)
    eager = [mlp_loss(x, lin) for x in xs]
    torch.stack(eager).sum().backward()
    expected_grads = grads(lin.parameters())
    zero(lin.parameters())

    losses = db.batched(mlp_loss, strategy=strategy)(xs, lin)
    assert type(losses) is list and len(losses) == 7
    assert_real_tensors(losses)
    close(losses, eager)
    torch.stack(losses).sum().backward()
    close(grads(lin.parameters()), expected_grads, "grads")
    s = db.stats()
    assert s.strategy == strategy and s.examples == 7
    assert s.batches <= 6, s          # const, linear, tanh, mul, sum: never per example


def test_decorator_forms():
    @db.batched
    def f(x):
        return x * 2

    @db.batched(strategy="depth")
    def g(x):
        return x * 3

    xs = vectors(3)
    close(f(xs), [x * 2 for x in xs])
    close(g(xs), [x * 3 for x in xs])
    assert db.stats().strategy == "depth"
    assert f.__name__ == "f"


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError):
        db.batched(lambda x: x, strategy="breadth")
    with pytest.raises(ValueError):
        with db.autobatch(strategy="breadth"):
            pass


def test_minibatch_may_be_a_tuple_or_a_tensor():
    xs = vectors(4)
    f = db.batched(lambda x: torch.sin(x))
    close(f(tuple(xs)), [torch.sin(x) for x in xs])
    close(f(torch.stack(xs)), [torch.sin(x) for x in xs])


def test_extra_kwargs_are_shared():
    @db.batched
    def f(x, scale, *, shift):
        return x * scale + shift

    xs = vectors(3)
    close(f(xs, 2.0, shift=1.0), [x * 2.0 + 1.0 for x in xs])


# -- the method form -----------------------------------------------------------------------

class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)
        self.out = nn.Parameter(torch.randn(H))

    def eager(self, seq):
        h = torch.zeros(H)
        for x in seq:
            h = torch.tanh(self.lin(x) + h)
        return h @ self.out

    @db.batched
    def forward(self, seq):
        return self.eager(seq)


class TinyModelDepth(TinyModel):
    @db.batched(strategy="depth")
    def forward(self, seq):
        return self.eager(seq)


@pytest.mark.parametrize("cls", [TinyModel, TinyModelDepth])
def test_batched_method_on_module(cls):
    torch.manual_seed(1)
    model = cls()
    seqs = [vectors(n, seed=n) for n in (1, 3, 2, 5)]
    eager = [model.eager(s) for s in seqs]
    torch.stack(eager).sum().backward()
    expected = grads(model.parameters())
    model.zero_grad(set_to_none=True)

    outs = model(seqs)
    assert type(outs) is list and len(outs) == 4
    assert_real_tensors(outs)
    close(outs, eager)
    torch.stack(outs).sum().backward()
    close(grads(model.parameters()), expected, "grads")
    assert db.stats().strategy == ("depth" if cls is TinyModelDepth else "agenda")
    # the method is also reachable through forward explicitly and the class attribute
    close(model.forward(seqs), eager)
    close(cls.forward(model, seqs), eager)


# -- result structures ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict", "nested"])
def test_result_structures(kind):
    def fn(x):
        a, b = torch.tanh(x), x.sum()
        return {"tensor": a, "tuple": (a, b), "list": [a, b], "dict": {"a": a, "b": b},
                "nested": {"pair": (a, [b, a * 2]), "n": 3}}[kind]

    xs = vectors(3)
    outs = db.batched(fn)(xs)
    eager = [fn(x) for x in xs]
    for o, e in zip(outs, eager):
        assert type(o) is type(e)
        if isinstance(e, dict):
            assert list(o) == list(e)
        close(o, e)
    assert_real_tensors([{k: v for k, v in o.items() if k != "n"} if isinstance(o, dict)
                         else o for o in outs])
    if kind == "nested":
        assert all(o["n"] == 3 for o in outs)     # Python values pass through


def test_shared_tensor_returned_as_is():
    w = torch.randn(3)
    outs = db.batched(lambda x, w: (x + 1, w))(vectors(2), w)
    assert all(o[1] is w for o in outs)


# -- autobatch scope -----------------------------------------------------------------------

def test_autobatch_scope_lazy_then_value():
    torch.manual_seed(2)
    lin = nn.Linear(3, 3)
    data = [[float(i), 1.0, -float(i)] for i in range(5)]
    with db.autobatch(strategy="agenda"):
        ys = [torch.tanh(lin(torch.tensor(v))) for v in data]
        assert all(type(y) is db.LazyTensor for y in ys)
        assert all("pending" in repr(y) for y in ys)
    outs = [y.value for y in ys]
    assert_real_tensors(outs)
    close(outs, [torch.tanh(lin(torch.tensor(v))) for v in data])
    s = db.stats()
    assert s.nodes == 15 and s.batches == 3, s


def test_autobatch_yields_a_run_and_force_structures():
    with db.autobatch() as run:
        ys = [torch.tensor([1.0, 2.0]) * k for k in range(3)]
        forced = db.force({"a": ys[0], "b": [ys[1], (ys[2], 7)]})
    assert run is not None
    assert type(forced["a"]) is torch.Tensor
    assert torch.equal(forced["a"], torch.tensor([0.0, 0.0]))
    assert torch.equal(forced["b"][0], torch.tensor([1.0, 2.0]))
    assert type(forced["b"][1]) is tuple and forced["b"][1][1] == 7
    assert torch.equal(forced["b"][1][0], torch.tensor([2.0, 4.0]))
    assert db.force(5) == 5


def test_concrete_values_inside_the_scope_then_still_batched():
    torch.manual_seed(3)
    lin = nn.Linear(3, 3)
    data = [[float(i), 0.5, 1.0 - i] for i in range(8)]
    ids = list(range(8))
    with db.autobatch():
        xs = [torch.tensor(v) for v in data]
        hs = [torch.tanh(lin(x)) for x in xs]                 # pending
        ks = [torch.tensor(i) * 3 + 1 for i in ids]           # integer, exact
        # reading values executes what is pending, batched
        v_item = hs[0].sum().item()
        v_float = float(hs[1].sum().detach())
        v_int = int(ks[2])
        v_bool = bool(ks[3] > 9)
        v_bool_false = bool(ks[0] > 9)
        v_list = hs[4].tolist()
        v_intlist = torch.stack([ks[5], ks[6]]).tolist()
        v_force = db.force(hs[7])
        assert type(v_force) is torch.Tensor
        # ... and the work after the reads is still batched across all examples
        ys = [torch.sigmoid(h).sum() for h in hs]
    eager_h = [torch.tanh(lin(torch.tensor(v))) for v in data]
    assert v_item == pytest.approx(eager_h[0].sum().item(), abs=1e-12)
    assert v_float == pytest.approx(eager_h[1].sum().item(), abs=1e-12)
    assert type(v_int) is int and v_int == 7
    assert v_bool is True and v_bool_false is False
    assert v_list == pytest.approx(eager_h[4].tolist(), abs=1e-12)
    assert v_intlist == [16, 19]
    close(v_force, eager_h[7])
    close([y.value for y in ys], [torch.sigmoid(h).sum() for h in eager_h])
    s = db.stats()
    # 8 examples x (const, linear, tanh, mul, add, sigmoid, sum) + the few reads (the
    # torch.tensor(i) are immediates, not nodes); per-example execution: ~70 batches
    assert s.nodes >= 56
    assert s.batches <= 16, s


def test_item_on_scope_result_types():
    with db.autobatch():
        t = torch.tensor(2.5) * 2
        assert t.item() == 5.0
        assert float(t) == 5.0
        assert int(torch.tensor(4) + 1) == 5
        assert (torch.tensor([1, 2]) + 1).tolist() == [2, 3]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_value_reads_inside_batched_code(strategy):
    # Per-example code may branch on a value: the read executes what is pending, batched,
    # and gives the real Python value.
    def fn(x):
        s = x.sum()
        if s.item() > 0:
            y = x * 2
        else:
            y = x * 3
        if bool(y.max() > 1.5):
            y = y + 1
        k = int(torch.tensor(len(x.tolist())) * 2)
        return y * k + float(s)

    xs = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -3.0]), torch.tensor([0.5, 0.25]),
          torch.tensor([3.0, -4.0])]
    outs = db.batched(fn, strategy=strategy)(xs)
    assert_real_tensors(outs)
    close(outs, [fn(x) for x in xs])


# -- metadata known at trace time ----------------------------------------------------------

def test_metadata_at_trace_time_allows_branching():
    seen = []

    def fn(x):
        y = torch.tanh(x)
        seen.append((tuple(y.shape), y.dtype, y.device.type, tuple(y.size()), y.size(0),
                     y.size(-1), y.dim(), y.ndim, len(y), y.numel(), y.is_floating_point()))
        if y.shape[0] > 3 and y.dim() == 1 and len(y) > 3 and y.size(0) > 3:
            out = y[:3].sum()
        else:
            out = y.sum() * 10
        if y.dtype == torch.float64 and y.device == torch.device("cpu"):
            out = out + 1
        return out

    xs = [torch.randn(n) for n in (2, 5, 3, 7)]
    outs = db.batched(fn)(xs)
    close(outs, [fn(x) for x in xs])
    assert seen[0] == ((2,), torch.float64, "cpu", (2,), 2, 2, 1, 1, 2, 2, True)
    assert seen[1][0] == (5,) and seen[1][8] == 5


def test_metadata_does_not_execute():
    with db.autobatch():
        y = torch.tanh(torch.ones(2, 3))
        assert y.shape == (2, 3) and y.size(1) == 3 and y.dim() == 2 and len(y) == 2
        assert y.dtype == torch.float64 and y.device.type == "cpu"
        assert y.numel() == 6
        assert "pending" in repr(y)


# -- per-example data: what batches --------------------------------------------------------

@pytest.mark.parametrize("form", ["tensor", "list", "tuple", "dict", "nested"])
def test_tensors_in_examples_batch(form):
    torch.manual_seed(4)
    w = torch.randn(3, 3)

    def make(i):
        a, b = torch.randn(3), torch.randn(3)
        return {"tensor": a, "list": [a, b], "tuple": (a, b), "dict": {"a": a, "b": b},
                "nested": {"a": [a, (b,)], "label": i}}[form]

    def fn(ex, w):
        if form == "tensor":
            a, b = ex, ex
        elif form in ("list", "tuple"):
            a, b = ex
        elif form == "dict":
            a, b = ex["a"], ex["b"]
        else:
            a, b = ex["a"][0], ex["a"][1][0]
        return torch.tanh(w @ a + b).sum()

    examples = [make(i) for i in range(6)]
    assert_matches_eager(fn, examples, w, atol=ATOL, rtol=RTOL)
    s = db.stats()
    assert s.nodes >= 6 * 4
    assert s.batches <= 6, s           # constants stack into one or two batches


def test_python_values_in_examples_stay_python():
    seen = []

    def fn(ex):
        seen.append(type(ex["n"]))
        return ex["x"] * ex["n"]

    examples = [{"x": torch.randn(2), "n": k} for k in range(3)]
    close(db.batched(fn)(examples), [fn(e) for e in examples])
    assert set(seen) == {int}


def test_tensors_made_inside_traced_code_batch():
    torch.manual_seed(5)
    table = nn.Embedding(10, 4)
    w = torch.randn(4)

    def fn(word_ids, table, w):
        total = torch.zeros(())
        for wid in word_ids:
            total = total + table.weight[torch.tensor(wid)] @ w
        return total

    sentences = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 1, 2], [3, 3, 3]]
    assert_matches_eager(fn, sentences, table, w, atol=ATOL, rtol=RTOL)
    s = db.stats()
    # per step: getitem, matmul, add (+ the zeros; the ids are immediates, not nodes):
    # 5 x (1 + 3 x 3) nodes
    assert s.nodes == 5 * 10
    assert s.batches <= 13, s


def test_parameters_are_shared_not_stacked():
    torch.manual_seed(6)
    W = nn.Parameter(torch.randn(4, 4))

    def fn(x, W):
        return (W @ x).sum()

    assert_matches_eager(fn, vectors(9, 4), W, atol=ATOL, rtol=RTOL)
    s = db.stats()
    assert s.signatures == 3 and s.batches == 3, s   # const, matmul, sum: one call each


# -- blocks --------------------------------------------------------------------------------

def rnn_cell(x, h, W, U):
    return torch.tanh(W @ x + U @ h)           # 4 recorded ops: matmul, matmul, add, tanh


block_cell = db.block(rnn_cell)


def run_cells(seq, W, U, cell):
    h = torch.zeros(W.shape[0])
    for x in seq:
        h = cell(x, h, W, U)
    return h


def seqs_of(lengths, size=4):
    return [vectors(n, size, seed=10 + n) for n in lengths]


def nodes_of(fn, examples, *args):
    db.batched(fn)(examples, *args)
    return db.stats().nodes


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_block_on_a_function(strategy):
    torch.manual_seed(7)
    W = nn.Parameter(torch.randn(4, 4) * 0.5)
    U = nn.Parameter(torch.randn(4, 4) * 0.5)
    seqs = seqs_of([1, 3, 2, 4])
    calls = sum(len(s) for s in seqs)
    consts = calls + len(seqs)                  # the inputs and one zeros per example

    def plain(seq, W, U):
        return run_cells(seq, W, U, rnn_cell)

    def blocked(seq, W, U):
        return run_cells(seq, W, U, block_cell)

    assert_matches_eager(blocked, seqs, W, U, atol=ATOL, rtol=RTOL, strategy=strategy)
    assert db.stats().nodes == consts + calls
    assert nodes_of(plain, seqs, W, U) == consts + 4 * calls
    # outside a run, the block is the plain function
    x, h = torch.randn(4), torch.randn(4)
    close(block_cell(x, h, W, U), rnn_cell(x, h, W, U))


class PlainCell(nn.Module):
    """3 recorded ops when not a block: cat, linear (a built-in block), tanh."""

    def __init__(self, n=4):
        super().__init__()
        self.lin = nn.Linear(2 * n, n)

    def forward(self, x, h):
        return torch.tanh(self.lin(torch.cat([x, h])))


@db.block
class BlockCell(PlainCell):
    pass


def module_loop(seq, cell):
    h = torch.zeros(4)
    for x in seq:
        h = cell(x, h)
    return h.sum()


@pytest.mark.parametrize("how", ["subclass", "instance"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_block_on_modules(how, strategy):
    torch.manual_seed(8)
    plain = PlainCell()
    if how == "subclass":
        marked = BlockCell()
        marked.load_state_dict(plain.state_dict())
    else:
        marked = PlainCell()
        marked.load_state_dict(plain.state_dict())
        assert db.block(marked) is marked
    seqs = seqs_of([2, 1, 3, 2])
    calls = sum(len(s) for s in seqs)
    consts = calls + len(seqs)
    sums = len(seqs)                            # module_loop ends with h.sum()
    assert_matches_eager(module_loop, seqs, marked, atol=ATOL, rtol=RTOL, strategy=strategy)
    assert db.stats().nodes == consts + calls + sums
    assert nodes_of(module_loop, seqs, plain) == consts + 3 * calls + sums
    # the mark is on the subclass / the instance only
    assert nodes_of(module_loop, seqs, PlainCell()) == consts + 3 * calls + sums


class CellOwner(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4) * 0.5)
        self.U = nn.Parameter(torch.randn(4, 4) * 0.5)

    def plain_cell(self, x, h):
        return torch.tanh(self.W @ x + self.U @ h)

    @db.block
    def cell(self, x, h):
        return torch.tanh(self.W @ x + self.U @ h)


def method_loop(seq, model, which):
    h = torch.zeros(4)
    cell = getattr(model, which)
    for x in seq:
        h = cell(x, h)
    return h


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_block_on_a_method(strategy):
    torch.manual_seed(9)
    model = CellOwner()
    seqs = seqs_of([3, 1, 2])
    calls = sum(len(s) for s in seqs)
    consts = calls + len(seqs)
    assert_matches_eager(method_loop, seqs, model, "cell", atol=ATOL, rtol=RTOL,
                         strategy=strategy)
    assert db.stats().nodes == consts + calls
    assert nodes_of(method_loop, seqs, model, "plain_cell") == consts + 4 * calls
    x, h = torch.randn(4), torch.randn(4)
    close(model.cell(x, h), model.plain_cell(x, h))


@db.block
def _mixer(m, pair, x, scale, name="mix"):
    h, c = pair
    return m(h) * scale + c + x


@pytest.mark.parametrize("values", [[3], [1, -2, 7], [True, 3], [2 ** 62, -(2 ** 63)], [2.5, 1],
                                    list(range(1000))])
def test_index_and_word_id_tensors_equal_torch_tensor(values):
    from dynbatch.execute import _long_tensor
    got = _long_tensor(values, device=torch.device("cpu"))
    want = torch.tensor(values, dtype=torch.int64)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_index_tensor_of_an_int_too_large_fails_as_torch_does():
    from dynbatch.execute import _long_tensor
    with pytest.raises(Exception) as ours:
        _long_tensor([2 ** 64])
    with pytest.raises(Exception) as theirs:
        torch.tensor([2 ** 64], dtype=torch.int64)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


@db.block
def _weighted(states, lin):
    return lin(states[0]) + states[-1]


def _history_loop(x, lin):
    # the user's lists change after each call that read them: every node must read them as
    # they were at the call (stack of < 4 members, of >= 4 (one bulk gather), cat, a block,
    # and the sum of a stack)
    history = [x]
    outs = []
    for _ in range(5):
        h = torch.tanh(lin(torch.stack(history).sum(0)))
        outs.append(torch.cat(history[-2:]))
        outs.append(torch.stack(history))
        outs.append(_weighted(history, lin))
        history.append(h)
    history[0] = x * 0
    return [o.sum() for o in outs] + [h]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_list_changed_after_the_call_is_read_as_it_was(strategy):
    torch.manual_seed(4)
    assert_matches_eager(_history_loop, vectors(4, seed=2), nn.Linear(H, H).double(),
                         strategy=strategy, atol=ATOL, rtol=RTOL)


def test_block_calls_are_keyed_as_signature_key_keys_them():
    # NOTE [block calls]: the block path builds its keys inline; a key of another shape
    # would split one signature in two (or, worse, merge two)
    from dynbatch import signature, trace
    lin = nn.Linear(3, 3)
    calls = []
    with db.autobatch() as run:
        x = torch.tanh(torch.randn(3))
        pair = (x * 2, x * 3)
        for args, kwargs in [((lin, pair, x, 2.0), {}), ((lin, list(pair), x, 3), {}),
                             ((lin, pair, x, True), {"name": "other"})]:
            before = set(run.local_signatures)
            _mixer(*args, **kwargs)
            new = set(run.local_signatures) - before
            calls.append((new, signature.signature_key(_mixer.__dynbatch_block__, args,
                                                       kwargs, run)[0]))
        trace.current_run().graph.nodes[:] = []     # nothing to execute
    for new, key in calls:
        assert new == {key}


def test_one_line_calling_a_block_with_changing_arguments_gets_each_call_its_signature():
    # NOTE [block calls]: a line remembers its last call's key; a call that differs from
    # it in any item (1 / 1.0 / True, a shape, another module, list or tuple) must not
    # reuse that call's signature
    from dynbatch import signature
    lins = [nn.Linear(3, 3), nn.Linear(3, 3)]
    with db.autobatch() as run:
        x3, x1 = torch.tanh(torch.randn(3)), torch.tanh(torch.randn(1))   # x1 broadcasts
        calls = [(lins[0], (x3, x3), x3, 1), (lins[0], (x3, x3), x3, 1.0),
                 (lins[0], (x3, x3), x3, True), (lins[1], (x3, x3), x3, 1),
                 (lins[0], [x3, x3], x3, 1), (lins[0], (x3, x3), x1, 1),
                 (lins[0], (x3, x3), x3, 1)]
        keys = []
        for args in calls:
            keys.append(signature.signature_key(_mixer.__dynbatch_block__, args, {}, run)[0])
            _mixer(*args)                # one line for every call
        nodes = [n for n in run.graph.nodes if n.fn is _mixer.__dynbatch_block__]
        assert [n.info for n in nodes] == [run.local_signatures[k] for k in keys]
        assert len({id(n.info) for n in nodes}) == len(calls) - 1   # the last repeats the first
        run.graph.nodes[:] = []          # nothing to execute


def _graph_as_data(run) -> list:
    """Every node of a run as comparable data: lazy arguments as (node id, output)."""
    def arg(a):
        if type(a) is db.LazyTensor:
            return ("lazy", a.node.id, a.index, a.tkey)
        if type(a) in (tuple, list):
            return (type(a), tuple(arg(x) for x in a))
        if isinstance(a, torch.Tensor):
            return ("tensor", a.tolist())
        return a
    keys = {id(info): key for key, info in run.local_signatures.items()}
    return [(n.id, n.fn, n.args and tuple(arg(a) for a in n.args), n.kwargs, n.inputs,
             n.depth, n.example, n.site, n.info.name, keys.get(id(n.info)), n.info.grad)
            for n in run.graph.nodes]


def _varied_block_calls(lins, cell):
    """Block calls from one line, repeating and changing: (h, c) pairs of one node,
    immediates, Python values of three types, two modules, another shape, a list, and
    the same call under no_grad."""
    x, x1 = torch.tanh(torch.randn(3)), torch.tanh(torch.randn(1))    # x1 broadcasts
    pairs = [cell(x * k) for k in range(3)]
    calls = [(lins[0], pairs[0], x, 1)] * 3 + [(lins[0], pairs[0], x, 2)] * 3 + \
        [(lins[0], pairs[0], x, 2.0)] * 3 + [(lins[0], pairs[0], x1, 2.0)] * 3 + \
        [(lins[0], pairs[1], x, 1.0)] * 3 + \
        [(lins[1], pairs[2], x, True), (lins[0], pairs[0], x, 1)] * 3 + \
        [(lins[0], (pairs[1][0], pairs[2][0]), torch.tensor(4), 2)] * 3 + \
        [(lins[1], list(pairs[1]), x, 1)] * 3 + [(lins[0], pairs[0], x, 1)] * 6
    modes = [torch.enable_grad] * (len(calls) - 3) + [torch.no_grad] * 3
    out = []
    for args, mode in zip(calls, modes):
        with mode():
            out.append(_mixer(*args))
    return out


def test_site_recorders_record_what_the_general_path_records(monkeypatch):
    # NOTE [site recorders]: a line whose call repeats gets a recorder; the graph is the
    # one the general path records, node for node, and the values are eager's
    from dynbatch import blocks
    lins = [nn.Linear(3, 3), nn.Linear(3, 3)]
    cell = db.block(lambda x: (torch.tanh(x), torch.sigmoid(x)))
    graphs, values = [], []
    for limit in (100, 0):      # a recorder for every layout met twice in a row; none
        monkeypatch.setattr(blocks, "_SITE_RECORDERS_PER_LINE", limit)
        torch.manual_seed(0)
        with db.autobatch() as run:
            out = _varied_block_calls(lins, cell)
            graphs.append(_graph_as_data(run))
            made = [known[4] for _, calls in run.block_sites.values()
                    for known in calls.values()]
            values.append([o.value for o in out])
        assert (max(made) > 0) == (limit > 0)
    assert graphs[0] == graphs[1]
    for a, b in zip(*values):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    eager = _varied_block_calls(lins, lambda x: (torch.tanh(x), torch.sigmoid(x)))
    for a, b in zip(values[0], eager):
        torch.testing.assert_close(a, b)


def test_a_site_recorder_takes_empty_and_one_item_tuples():
    # NOTE [site recorders]: layouts with nothing to unpack, or one item, compile and run
    @db.block
    def scale(x, none, one, k):
        return x * k + one[0]

    with db.autobatch():
        x = torch.tanh(torch.randn(3))
        out = [scale(x, (), (x,), 2.0) for _ in range(4)]
        values = [o.value for o in out]
    for v in values:
        torch.testing.assert_close(v, x.value * 3.0)


def test_a_line_whose_calls_keep_changing_makes_few_recorders():
    # NOTE [site recorders]: each recorder serves one layout; a line alternating two
    # modules stops making them after _SITE_RECORDERS_PER_LINE
    from dynbatch import blocks
    lins = [nn.Linear(3, 3), nn.Linear(3, 3)]
    with db.autobatch() as run:
        x = torch.tanh(torch.randn(3))
        pair = (x * 2, x * 3)
        out = [_mixer(lins[k // 2 % 2], pair, x, 1) for k in range(40)]
        (made,) = [known[4] for _, calls in run.block_sites.values()
                   for known in calls.values()]
        assert made == blocks._SITE_RECORDERS_PER_LINE
        assert len({id(o.node.info) for o in out}) == 2
        values = [o.value for o in out]
    for k, v in enumerate(values):
        torch.testing.assert_close(v, lins[k // 2 % 2](x.value * 2) + x.value * 3 + x.value)


def test_a_site_recorder_refuses_a_lazy_tensor_of_another_run():
    # NOTE [site recorders]: the recorder's guards fail, and the general path says why
    from dynbatch.errors import MixedRunError
    lin = nn.Linear(3, 3)
    with db.autobatch():
        stale = torch.tanh(torch.randn(3))
        stale_pair = (stale * 2, stale)
        stale.value
    with pytest.raises(MixedRunError):
        with db.autobatch():
            x = torch.tanh(torch.randn(3))
            pair = (x * 2, x)
            for args in [(lin, pair, x, 1)] * 3 + [(lin, stale_pair, x, 1)]:
                _mixer(*args)


def _varied_op_calls():
    """Calls from one line that repeat and change: two functions, lazy and Python second
    arguments (int, float, another value, nan, a bool), another shape, chunk outputs
    (not first outputs), immediates, a tensor whose tkey is equal but not the same
    object, an operator on one line too, and the same call under no_grad."""
    x, x1 = torch.tanh(torch.randn(3)), torch.tanh(torch.randn(1))
    parts = torch.tanh(torch.randn(6)).chunk(2)
    same_shape = torch.randn(3)          # a constant: its tkey is a tuple of its own
    calls = [(torch.mul, x, x)] * 3 + [(torch.mul, x, 2.0)] * 3 + [(torch.mul, x, 2)] * 3 + \
        [(torch.mul, x, 3)] * 2 + [(torch.add, x, 3)] * 2 + [(torch.mul, x1, 2.0)] * 2 + \
        [(torch.mul, parts[1], parts[0])] * 3 + [(torch.mul, parts[0], parts[1])] * 2 + \
        [(torch.mul, x, torch.tensor(4))] * 3 + [(torch.mul, torch.tensor(4), x)] * 2 + \
        [(torch.sigmoid, x)] * 3 + [(torch.sigmoid, parts[1])] * 2 + \
        [(torch.mul, x, x)] * 2 + [(torch.mul, x, x1)] * 2 + \
        [(torch.mul, x, float("nan"))] * 2 + \
        [(torch.mul, x, True)] * 2 + [(torch.mul, same_shape, 2.0)] * 2 + \
        [(torch.sigmoid, x)] * 3 + [(torch.mul, x, 2.0)] * 6
    modes = [torch.enable_grad] * (len(calls) - 3) + [torch.no_grad] * 3
    out = []
    for (f, *args), mode in zip(calls, modes):
        with mode():
            out.append(f(*args))
            out.append(args[0] * args[-1])
    return out


def test_op_sites_record_the_graph_the_general_path_does(monkeypatch):
    # NOTE [op sites]: a line's repeated call skips the key; the graph is the one the
    # general path records, node for node, and the values are eager's
    from dynbatch import trace
    graphs, values, hits = [], [], []
    remembered = trace._record_as_before
    counted = [0]

    def counting(*args):
        out = remembered(*args)
        counted[0] += out is not None
        return out
    for fast in (counting, lambda *args: None):
        monkeypatch.setattr(trace, "_record_as_before", fast)
        torch.manual_seed(0)
        counted[0] = 0
        with db.autobatch() as run:
            out = _varied_op_calls()
            graphs.append(_graph_as_data(run))
            values.append([o.value for o in out])
        hits.append(counted[0])
    assert hits[0] > 20 and hits[1] == 0
    assert graphs[0] == graphs[1]
    for a, b in zip(*values):
        torch.testing.assert_close(a, b, equal_nan=True)
    torch.manual_seed(0)
    for a, b in zip(values[0], _varied_op_calls()):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_an_op_site_refuses_a_lazy_tensor_of_another_run():
    # NOTE [op sites]: the remembered call does not match, and the general path says why
    from dynbatch.errors import MixedRunError
    with db.autobatch():
        stale = torch.tanh(torch.randn(3))
        stale.value
    for second in (False, True):
        with pytest.raises(MixedRunError):
            with db.autobatch():
                x = torch.tanh(torch.randn(3))
                for a in [x, x, x, stale]:
                    torch.mul(x, a) if second else torch.sigmoid(a)


def _linear(ex, m):
    return m(ex)


def _embedding(ex, m):
    return m(torch.tensor(ex))


def _lstm(ex, m):
    h, c = torch.zeros(5), torch.zeros(5)
    for x in ex:
        h, c = m(x, (h, c))
    return h, c


def _lstm_no_state(ex, m):
    return m(ex[0])


def _gru(ex, m):
    h = torch.zeros(5)
    for x in ex:
        h = m(x, h)
    return h


@pytest.mark.parametrize("name, module, fn, make, nodes_per_example", [
    ("Linear", lambda: nn.Linear(4, 5), _linear, lambda i: torch.randn(4), 2),
    ("Linear-2d", lambda: nn.Linear(4, 5), _linear, lambda i: torch.randn(3, 4), 2),
    ("Embedding", lambda: nn.Embedding(7, 5), _embedding, lambda i: [i % 7, (i * 3) % 7], 2),
    ("LayerNorm", lambda: nn.LayerNorm(4), _linear, lambda i: torch.randn(4), 2),
    ("LSTMCell", lambda: nn.LSTMCell(4, 5), _lstm, lambda i: [torch.randn(4)] * 3, 3 + 2 + 3),
    ("LSTMCell-no-state", lambda: nn.LSTMCell(4, 5), _lstm_no_state,
     lambda i: [torch.randn(4)], 2),
    ("GRUCell", lambda: nn.GRUCell(4, 5), _gru, lambda i: [torch.randn(4)] * 3, 3 + 1 + 3),
    ("RNNCell", lambda: nn.RNNCell(4, 5), _gru, lambda i: [torch.randn(4)] * 3, 3 + 1 + 3),
])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_builtin_blocks(name, module, fn, make, nodes_per_example, strategy):
    torch.manual_seed(10)
    m = module()
    examples = [make(i) for i in range(5)]
    assert_matches_eager(fn, examples, m, atol=ATOL, rtol=RTOL, strategy=strategy)
    s = db.stats()
    assert s.nodes == 5 * nodes_per_example, s
    assert s.fallbacks == 0


# -- stats, edge cases ----------------------------------------------------------------------

def test_stats_fields():
    lin = nn.Linear(3, 3)
    db.batched(lambda x, lin: lin(x).sum())(vectors(4, 3), lin)
    s = db.stats()
    for field in ("strategy", "examples", "nodes", "batches", "fallbacks", "vmap_batches",
                  "trace_s", "schedule_s", "execute_s", "signatures"):
        assert hasattr(s, field), field
    assert s.examples == 4 and s.strategy == "agenda"
    assert s.nodes == 12 and s.batches == 3 and s.signatures == 3
    assert s.fallbacks == 0 and s.vmap_batches == 0
    for t in (s.trace_s, s.schedule_s, s.execute_s):
        assert isinstance(t, float) and 0.0 <= t < 60.0
    assert s.nodes_per_batch == pytest.approx(4.0)
    assert "12 nodes in 3 batches" in str(s)


def test_empty_minibatch_returns_empty_list():
    before = db.stats()
    assert db.batched(lambda x: x * 2)([]) == []
    assert db.batched(lambda x: x * 2)(()) == []
    assert db.stats() is before


@pytest.mark.parametrize("bad", [3, 2.5, None, "abc", (x for x in [torch.ones(2)]),
                                 {"a": torch.ones(2)}, torch.tensor(1.0)])
def test_non_sequence_minibatch_raises_type_error(bad):
    with pytest.raises(TypeError):
        db.batched(lambda x: x * 2)(bad)


def test_missing_minibatch_raises_type_error():
    with pytest.raises(TypeError):
        db.batched(lambda x: x)()


def test_nested_batched_inside_a_run():
    torch.manual_seed(11)
    lin = nn.Linear(3, 3)

    def inner(v, lin):
        return torch.tanh(lin(v))

    inner_b = db.batched(inner)

    def outer(seq, lin):
        return torch.stack(inner_b(seq, lin)).sum(0)

    def outer_eager(seq, lin):
        return torch.stack([inner(v, lin) for v in seq]).sum(0)

    seqs = [vectors(n, 3, seed=n) for n in (2, 4, 3)]
    outs = db.batched(outer)(seqs, lin)
    assert_real_tensors(outs)
    close(outs, [outer_eager(s, lin) for s in seqs])
    s = db.stats()
    assert s.examples == 3
    # the inner calls of all outer examples were batched by the one outer run: one batch
    # each for the inputs, linear and tanh; the sums of stacks of every length are one
    # more (NOTE [stacked sums]), and the stacks themselves never run
    assert s.nodes == 3 * 9 + 3 * 2
    assert s.batches == 3 + 1, s
    # and a nested call inside an autobatch scope joins that scope
    with db.autobatch():
        ys = inner_b([torch.ones(3), torch.zeros(3)], lin)
        assert all(type(y) is db.LazyTensor for y in ys)
    close([y.value for y in ys], [inner(torch.ones(3), lin), inner(torch.zeros(3), lin)])


def test_public_names():
    assert set(db.__all__) == {"batched", "autobatch", "force", "block", "stats",
                               "LazyTensor"}
    assert isinstance(db.stats(), object) and isinstance(db, types.ModuleType)


def test_no_grad_inside_batched_code():
    lin = nn.Linear(3, 3)

    def fn(x, lin):
        with torch.no_grad():
            y = lin(x)
        return y * 2, lin(x).sum()

    outs = db.batched(fn)(vectors(3, 3), lin)
    assert all(not o[0].requires_grad for o in outs)
    assert all(o[1].requires_grad for o in outs)
    close(outs, [fn(x, lin) for x in vectors(3, 3)])


def test_functional_ops_with_shared_kwargs():
    w = torch.randn(5, 3)

    def fn(ids, w):
        e = F.embedding(torch.tensor(ids), w)
        return F.softmax(e.sum(0), dim=-1)

    assert_matches_eager(fn, [[1, 2], [3, 4], [0, 0]], w, atol=ATOL, rtol=RTOL)


def test_dead_code_gives_no_gradient():
    # A value computed and never used must not connect its parameters to the outputs:
    # eager leaves W.grad None. Fusing the dead tanh with the live one in one batched call
    # must not turn that into a zero gradient (optimizers treat zeros and None differently:
    # momentum and weight decay still move a parameter whose grad is zeros).
    torch.manual_seed(12)
    W = nn.Parameter(torch.randn(3, 3))
    v = nn.Parameter(torch.randn(3))

    def fn(x, W, v):
        dead = torch.tanh(W @ x)  # noqa: F841  (computed, never used)
        return torch.tanh(x * v)

    assert_matches_eager(fn, vectors(4, 3), W, v, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("op", ["stack", "cat"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_stack_and_cat_of_many_members_gather_in_bulk(op, dim, monkeypatch):
    # torch.stack(losses) over many per-example tensors: the executor gathers all members
    # in one go (execute._bulk); results and gradients must stay those of eager.
    from dynbatch import execute
    calls = []
    real = execute._bulk
    monkeypatch.setattr(execute, "_bulk", lambda nodes, d: calls.append(d) or real(nodes, d))
    W = nn.Parameter(torch.randn(3, 3))

    def fn(n, W):
        xs = [torch.tanh(W @ torch.full((3,), float(i + n))).reshape(3, 1) for i in range(5)]
        return getattr(torch, op)(xs, dim=dim).sin()
    assert_matches_eager(fn, [1, 2, 3], W, atol=ATOL, rtol=RTOL)
    assert calls, "the bulk path was not taken"


def test_bulk_list_signatures_are_what_inference_finds_and_stay_in_their_run(monkeypatch):
    # NOTE [list signatures stay in their run]: a stack or cat of >= 4 lazy tensors of one
    # shape gets its signature from the members' shape, not from inference; it must be the
    # one inference makes, and it is not kept across runs
    from dynbatch import infer, signature
    from dynbatch.errors import TraceError
    cases = [(op, n, dim) for op, dims in (("stack", (0, 1, 2, -1, -3)), ("cat", (0, 1, -2)))
             for n in (4, 7) for dim in dims]

    def signatures(general: bool):
        if general:     # no shortcut, nothing cached: inference decides every case
            monkeypatch.setattr(infer, "_list_signature", lambda *a: None)
            monkeypatch.setattr(infer, "is_cacheable", lambda key: False)
        with db.autobatch():
            x = torch.tanh(torch.randn(2, 3))
            outs = [getattr(torch, op)([x * float(k) for k in range(n)], dim=dim)
                    for op, n, dim in cases]
            infos = [o.node.info for o in outs]
        monkeypatch.undo()
        return infos, outs
    fast, fast_outs = signatures(False)
    general, general_outs = signatures(True)
    for case, a, b, ya, yb in zip(cases, fast, general, fast_outs, general_outs):
        assert (a.kind, a.fn, a.rule, a.outputs, a.structure, a.paths, a.per_example,
                a.grad, a.name, a.direct) == \
            (b.kind, b.fn, b.rule, b.outputs, b.structure, b.paths, b.per_example, b.grad,
             b.name, b.direct), case
        assert a.direct is not None and a.direct[0] in (infer.BULK_STACK, infer.BULK_CAT)
        assert ya.shape == yb.shape and ya.value.shape == yb.value.shape, case
        assert all(info is not a for info in signature.GLOBAL_SIGNATURES.values())
    for op, dim in (("stack", 3), ("stack", -4), ("cat", 2), ("cat", -3)):
        with pytest.raises(TraceError, match="IndexError|out of range"):
            with db.autobatch():
                x = torch.tanh(torch.randn(2, 3))
                getattr(torch, op)([x * float(k) for k in range(4)], dim=dim)


def _binary_trees(n, seed):
    """Random binary trees as nested pairs of leaf values: children at uneven depths, so a
    cell's inputs lie in several earlier batches."""
    rng = torch.Generator().manual_seed(seed)

    def grow(size):
        if size == 1:
            return float(torch.rand((), generator=rng))
        left = int(torch.randint(1, size, (), generator=rng))
        return (grow(left), grow(size - left))
    return [grow(int(torch.randint(1, 9, (), generator=rng))) for _ in range(n)]


@db.block
def _tree_leaf(x, V):
    h = torch.tanh(V * x)
    return h, h * 0.5


@db.block
def _tree_cell(left, right, W):
    (hl, cl), (hr, cr) = left, right
    z = W @ torch.cat([hl, hr])
    c = torch.sigmoid(z[:3]) * cl + torch.sigmoid(z[3:]) * cr
    return torch.tanh(c), c


def _encode_tree(tree, V, W):
    if isinstance(tree, tuple):
        return _tree_cell(_encode_tree(tree[0], V, W), _encode_tree(tree[1], V, W), W)
    return _tree_leaf(torch.tensor(tree), V)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_alike_inputs_from_several_batches_gather_as_one(strategy, monkeypatch):
    # NOTE [joint gathers]: (hl, hr) and (cl, cr) each in one gather of 2n rows once the
    # children lie in several batches; while they lie in one (the leaves), four of n rows.
    from dynbatch import execute
    per_batch = []
    real_run, real_gather = execute.run_batch, execute._gather

    def run_batch(nodes, info):
        per_batch.append((info.name, len(nodes), []))
        return real_run(nodes, info)

    def gather(column, memo, in_order):     # every gather, the first column's too
        if per_batch:
            per_batch[-1][2].append(len(column))
        return real_gather(column, memo, in_order)

    monkeypatch.setattr(execute, "run_batch", run_batch)
    monkeypatch.setattr(execute, "_gather", gather)
    torch.manual_seed(5)
    V = nn.Parameter(torch.randn(3))
    W = nn.Parameter(torch.randn(6, 6) * 0.5)

    def fn(tree, V, W):
        return _encode_tree(tree, V, W)[0]

    trees = _binary_trees(12, seed=1)
    per_batch.clear()
    assert_matches_eager(fn, trees, V, W, atol=ATOL, rtol=RTOL, strategy=strategy)
    cells = [(n, sizes) for name, n, sizes in per_batch if name.endswith("_tree_cell")]
    joined = [(n, sizes) for n, sizes in cells if sizes == [2 * n, 2 * n]]
    assert joined, cells
    assert all(sizes in ([2 * n, 2 * n], [n] * 4) for n, sizes in cells), cells
    assert cells[0][1] == [cells[0][0]] * 4     # the first cells read only leaves: one batch


def test_joined_columns_may_read_different_outputs_row_by_row():
    # Two alike columns are joined when the first one's rows come from several batches;
    # within a column each row may name another output of its node (a or b here).
    @db.block
    def pair(x):
        return torch.tanh(x), torch.sigmoid(x) * 3

    @db.block
    def combine(a, b):
        return a * 2 + b

    W = nn.Parameter(torch.randn(3, 3) * 0.5)

    def fn(i, W):
        p = pair(W @ torch.full((3,), float(i)))
        for _ in range(i):
            p = pair(p[0] + 1)
        return combine(p[i % 2], p[0]) + combine(p[0], p[1 - i % 2])

    assert_matches_eager(fn, [0, 1, 2, 3, 4, 5], W, atol=ATOL, rtol=RTOL)


def _plans_by_batch(monkeypatch):
    """[(batch name, gather plans)] of every batch run: 0 a zero-copy slice, 1 an
    index_select, "cat" sources joined in order, "cat+reorder" joined and reordered."""
    from dynbatch import execute
    runs = []
    real_run, real_apply = execute.run_batch, execute._apply

    def run_batch(nodes, info):
        runs.append((info.name, []))
        return real_run(nodes, info)

    def apply(plan, index):
        runs[-1][1].append(plan[0] if plan[0] != execute._MANY
                           else "cat" if plan[2] is None else "cat+reorder")
        return real_apply(plan, index)

    monkeypatch.setattr(execute, "run_batch", run_batch)
    monkeypatch.setattr(execute, "_apply", apply)
    return runs


def test_a_batch_of_several_outputs_takes_them_one_after_the_other(monkeypatch):
    # NOTE [row order]: sigmoid of i, f, o of each example's chunk() is one batch. Its
    # members, released example by example, interleave the three outputs; ordered by
    # output instead, its input is the three outputs joined as they are, and each mul or
    # add after it finds its rows in order: no gather copies a row.
    runs = _plans_by_batch(monkeypatch)
    W = nn.Parameter(torch.randn(12, 4, dtype=torch.float64))

    def gates(x, W):
        i, f, o = (W @ x).chunk(3)
        return torch.sigmoid(i) * torch.sigmoid(f) + torch.sigmoid(o)

    xs = [torch.randn(4, dtype=torch.float64) for _ in range(6)]
    assert_matches_eager(gates, xs, W, atol=ATOL, rtol=RTOL)
    plans = [plan for _, ps in runs for plan in ps]
    assert "cat" in plans and set(plans) == {0, "cat"}, runs


def test_a_batch_takes_the_row_order_of_its_first_input(monkeypatch):
    # NOTE [row order]: a * b is released as each example's chain of sigmoids ends, so its
    # members come shortest chain first while their a rows lie in example order: reordered
    # by a's rows, the batch reads a as it lies (a slice), not through an index_select.
    runs = _plans_by_batch(monkeypatch)
    W = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

    def chain(example, W):
        x, length = example
        a = torch.tanh(W @ x)
        b = x
        for _ in range(length):
            b = torch.sigmoid(b)
        return a * b

    examples = [(torch.randn(4, dtype=torch.float64), n) for n in (3, 1, 2, 1, 3, 2)]
    assert_matches_eager(chain, examples, W, atol=ATOL, rtol=RTOL)
    (mul_plans,) = [ps for name, ps in runs if name == "Tensor.__mul__"]
    assert mul_plans[0] == 0, runs       # a: a slice of tanh's output


def test_block_nodes_list_each_input_node_once_and_no_immediates():
    # NOTE [block edges]: the scheduler sees (h, c) of one node as one edge and no edge for
    # a word id; the depth still counts the immediate, and the values are eager's.
    @db.block
    def split(x):
        return torch.tanh(x), torch.sigmoid(x)

    @db.block
    def merge(pair, y):
        a, b = pair
        return a * b + y

    with db.autobatch() as run:
        pairs = [split(torch.tensor(v)) for v in (0.5, -1.0, 2.0)]
        outs = [merge(p, torch.tensor(3.0)) for p in pairs]
        assert [input_ids(p[0].node) for p in pairs] == [(), (), ()]
        assert [p[0].node.depth for p in pairs] == [1, 1, 1]
        assert [input_ids(o.node) for o in outs] == [(p[0].node.id,) for p in pairs]
        run.graph.lint()
        outs[0].item()          # executes them all: their arguments are dropped
        run.graph.lint()
    for v, o in zip((0.5, -1.0, 2.0), outs):
        x = torch.tensor(v)
        torch.testing.assert_close(o.value, torch.tanh(x) * torch.sigmoid(x) + 3.0)
    assert db.stats().batches == 2


def test_an_immediate_read_by_several_batches_and_returned():
    # A column of fresh immediates (word ids, labels) becomes one tensor without rows
    # recorded; a second reader builds its own, and one returned as a result still has
    # its value.
    emb = nn.Embedding(10, 3)

    def f(i):
        t = torch.tensor(i)
        return emb(t) * 2, t * 3, t

    ids = [4, 0, 7, 4]
    outs = db.batched(f)(ids)
    assert db.stats().batches <= 4
    torch.stack([e for e, _, _ in outs]).sum().backward()
    grad, emb.weight.grad = emb.weight.grad, None
    for i, (e, tripled, t) in zip(ids, outs):
        want = f(i)
        torch.testing.assert_close(e, want[0])
        assert tripled.item() == 3 * i and t.item() == i and t.dtype == torch.int64
    torch.stack([f(i)[0] for i in ids]).sum().backward()
    torch.testing.assert_close(grad, emb.weight.grad)


def test_equal_ints_share_one_immediate_and_results_stay_apart():
    # NOTE [shared immediates]: one lazy tensor per int per run, read like any other; a
    # read fills it, and later columns still make it from its value; results do not alias.
    emb = nn.Embedding(10, 3)

    def f(i):
        t = torch.tensor(i)
        return emb(t) * 2, t

    with db.autobatch() as run:
        a, b, c = torch.tensor(4), torch.tensor(4), torch.tensor(5)
        assert a is b and c is not a and c.node is not a.node
        assert a.item() == 4                  # filled now
        rows = [emb(t) for t in (c, a, b, c)]
        values = [r.value for r in rows]
    for r, i in zip(values, (5, 4, 4, 5)):
        torch.testing.assert_close(r, emb(torch.tensor(i)))

    ids = [4, 0, 4]
    outs = db.batched(f)(ids)
    assert outs[0][1] is not outs[2][1]
    outs[0][1].add_(1)                        # eager's results are tensors of their own
    assert [t.item() for _, t in outs] == [5, 0, 4]
    for (e, _), i in zip(outs, ids):
        torch.testing.assert_close(e, emb(torch.tensor(i)) * 2)


@pytest.mark.parametrize("drop", [
    lambda x: F.dropout(x, 0.0, True),
    lambda x: F.dropout(x, p=0.5, training=False),
    lambda x: torch.dropout(x, 0.0, True),
    lambda x: F.alpha_dropout(x, 0.5),                  # training defaults to False
    lambda x: nn.Dropout(0.3).eval()(x),
    lambda x: nn.Dropout(0.0)(x),
], ids=["p0", "eval", "torch.dropout", "alpha", "module-eval", "module-p0"])
def test_a_dropout_that_drops_nothing_returns_its_input(drop):
    # NOTE [identity dropout]: eager returns the very input; so does the trace, recording
    # no node for it, and values and gradients stay eager's.
    W = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    seen = []

    def fn(x, W):
        h = torch.tanh(W @ x)
        out = drop(h)
        seen.append(out is h)
        return out * 2

    xs = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
    assert_matches_eager(fn, xs, W, atol=ATOL, rtol=RTOL)
    assert seen == [True] * 8          # eager's four, then the trace's four
    assert db.stats().nodes == 4 * 4   # x, W @ x, tanh, * 2: no dropout node


@pytest.mark.parametrize("hooked", ["forward_hook", "forward_pre_hook", "global_hook",
                                    "own_forward"])
def test_a_dropout_module_that_drops_nothing_still_runs_what_eager_runs(hooked):
    # NOTE [identity dropout] at the module: the shortcut leaves alone any call that would
    # run more than F.dropout (a hook, a forward of the instance's own)
    calls = []
    drop = nn.Dropout(0.0)
    handle = None
    if hooked == "forward_hook":
        drop.register_forward_hook(lambda m, args, out: calls.append(1) or out * 3)
    elif hooked == "forward_pre_hook":
        drop.register_forward_pre_hook(lambda m, args: calls.append(1) or (args[0] * 3,))
    elif hooked == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out: (calls.append(1) or out * 3) if m is drop else None)
    else:
        drop.forward = lambda x: calls.append(1) or x * 3
    W = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))

    def fn(x, W):
        return drop(torch.tanh(W @ x)) * 2

    try:
        xs = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
        assert_matches_eager(fn, xs, W, atol=ATOL, rtol=RTOL)
    finally:
        if handle is not None:
            handle.remove()
    assert len(calls) == 8                  # eager's four, then the trace's four
    assert db.stats().nodes == 5 * 4        # x, W @ x, tanh, the hook's * 3, * 2


def test_a_dropout_module_that_drops_still_drops():
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    outs = db.batched(lambda x: drop(torch.tanh(x)))([torch.ones(100) for _ in range(8)])
    assert db.stats().nodes == 3 * 8                  # x, tanh, dropout
    values = torch.stack(outs)
    kept = values != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(values[kept], torch.tanh(torch.ones(())).expand(
        int(kept.sum())) * 2)


def test_a_dropout_that_drops_is_still_batched():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 3))

    def fn(x, W):
        return F.dropout(torch.tanh(W @ x), 0.5, True).sum()

    outs = db.batched(fn)([torch.ones(3) for _ in range(64)], W)
    assert db.stats().nodes == 5 * 64 and db.stats().batches <= 5
    torch.stack(outs).sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_nodes_of_one_signature_share_one_dict_of_plain_keywords():
    # append_node: plain keyword values are part of the key, so every node of a signature
    # has the same ones; they keep one dict, not one each. Lazy keyword values stay per node.
    def f(x, y):
        a = torch.cat([x, y], dim=0)
        b = torch.cat([x, y], dim=-1)
        c = torch.add(x, other=y, alpha=2.0)
        return a.sum() + b.sum() + c.sum()

    xs = [torch.randn(3) for _ in range(4)]
    ys = [torch.randn(3) for _ in range(4)]
    with db.autobatch() as run:
        # per-example data made inside the scope: lazy, so f records nodes
        outs = [f(torch.tensor(x.tolist()), torch.tensor(y.tolist())) for x, y in zip(xs, ys)]
        cats = [n for n in run.graph.nodes if getattr(n.fn, "__name__", "") == "cat"]
        adds = [n for n in run.graph.nodes if getattr(n.fn, "__name__", "") == "add"]
        by_dim = {}
        for n in cats:
            by_dim.setdefault(n.kwargs["dim"], []).append(n)
        assert sorted(by_dim) == [-1, 0] and all(len(v) == 4 for v in by_dim.values())
        for group in by_dim.values():
            assert all(n.kwargs is group[0].kwargs for n in group)
        assert by_dim[0][0].kwargs is not by_dim[-1][0].kwargs
        assert len(adds) == 4 and len({id(n.kwargs) for n in adds}) == 4   # y is lazy
        values = [o.value for o in outs]
    for x, y, v in zip(xs, ys, values):
        torch.testing.assert_close(v, f(x, y))


def test_lean_nodes_take_their_function_from_the_signature():
    # NOTE [lean nodes]: a node without keywords whose function is its signature's keeps
    # neither (16 bytes a node); the others are CallNodes and keep both. A plain node keeps
    # no arguments either, nor an example index: a Node is 96 bytes, an ArgsNode 112
    from dynbatch.graph import ArgsNode, CallNode, Node

    def f(x):
        h = torch.tanh(x * 2.0)
        return torch.cat([h, torch.sigmoid(h)], dim=0).sum()

    xs = [torch.randn(3) for _ in range(3)]
    with db.autobatch() as run:
        outs = [f(torch.tensor(x.tolist())) for x in xs]
        nodes = run.graph.nodes
        plain = [n for n in nodes if type(n) is Node]
        kept = [n for n in nodes if type(n) is ArgsNode]
        called = [n for n in nodes if type(n) is CallNode]
        assert len(plain) + len(kept) + len(called) == len(nodes)
        assert {getattr(n.fn, "__name__", None) for n in called} == {"cat"}
        assert all(n.kwargs == {"dim": 0} for n in called)
        assert all(n.kwargs is None and n.fn is n.info.fn for n in plain + kept)
        assert all(n.args is None for n in plain) and all(n.args for n in kept)
        assert len(plain) >= 4 * 3 and kept
        assert sys.getsizeof(plain[-1]) < sys.getsizeof(kept[0]) < sys.getsizeof(called[0])
        values = [o.value for o in outs]
    for x, v in zip(xs, values):
        torch.testing.assert_close(v, f(x))


def test_a_block_call_on_one_first_output_keeps_no_arguments():
    # NOTE [plain blocks]: self.W(x) keeps inputs and its signature's template, not its
    # argument tuple and lazy tensor; a second output, or two lazy arguments, keep them
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)

    def f(x):
        first, second = torch.chunk(torch.tanh(x), 2)
        return (lin(first) * 2.0).sum() + lin(second).sum() + lin(first + second).sum()

    xs = [torch.randn(8) for _ in range(3)]
    with db.autobatch() as run:
        outs = [f(torch.tensor(x.tolist())) for x in xs]
        calls = [n for n in run.graph.nodes if n.fn is lin]
        assert len(calls) == 9
        plain = [n for n in calls if n.args is None]
        assert len(plain) == 6                    # lin(first) and lin(first + second)
        assert all(run.templates[n.info] == (None,) for n in plain)
        assert all(n.args is not None and n.args[0].index == 1 for n in calls
                   if n.args is not None)
        run.graph.lint()
        values = [o.value for o in outs]
    _assert_sum_and_gradients_match_eager(values, f, xs, lin)


def test_plain_nodes_may_read_later_outputs_of_their_inputs():
    # NOTE [indexed plain nodes]: sigmoid(f) of `i, f, o = gates.chunk(3)` keeps no
    # argument tuple and no lazy tensor; its row holds the output it reads, until it runs
    from dynbatch import execute
    from dynbatch.graph import input_index

    torch.manual_seed(0)
    lin = nn.Linear(4, 6)

    def f(x):
        i, g, o = lin(x).chunk(3)
        h = torch.sigmoid(i) * torch.tanh(g) + torch.sigmoid(o) * 2.0
        return (h * o).sum() + (g * 3.0).sum()    # (h, o): output 0 of one, 2 of another

    xs = [torch.randn(4) for _ in range(3)]
    with db.autobatch() as run:
        outs = [f(torch.tensor(x.tolist())) for x in xs]
        nodes = run.graph.nodes
        chunks = {n.id for n in nodes if getattr(n.fn, "__name__", "") == "chunk"}
        readers = [n for n in nodes if any(j in chunks for j in input_ids(n))]
        assert len(readers) == 3 * 5        # sigmoid(i), tanh(g), sigmoid(o), h * o, g * 3
        assert all(n.args is None for n in readers)
        indices = sorted({(getattr(n.fn, "__name__", ""), k, input_index(n, k))
                          for n in readers for k, j in enumerate(input_ids(n)) if j in chunks})
        assert ("sigmoid", 0, 0) in indices and ("sigmoid", 0, 2) in indices
        assert ("tanh", 0, 1) in indices and ("__mul__", 1, 2) in indices
        sig_o = next(n for n in readers if n.fn.__name__ == "sigmoid" and input_index(n, 0))
        assert sig_o.info.indexed
        rebuilt = execute.node_args(sig_o)          # what error recovery runs the node on
        assert rebuilt[0].index == 2 and rebuilt[0].node.id in chunks
        run.graph.lint()
        values = [o.value for o in outs]
    _assert_sum_and_gradients_match_eager(values, f, xs, lin)


def _assert_sum_and_gradients_match_eager(values, f, xs, module):
    """The sum of a run's results and the gradients it gives ``module`` are eager's."""
    total = torch.stack(values).sum()
    total.backward()
    got = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    expected = torch.stack([f(x) for x in xs]).sum()
    expected.backward()
    torch.testing.assert_close(total, expected)
    for g, p in zip(got, module.parameters()):
        torch.testing.assert_close(g, p.grad)
