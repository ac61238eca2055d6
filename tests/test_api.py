"""The public API of DESIGN.md: batched (function and method forms), autobatch, force,
block, stats. Every result is compared with plain eager PyTorch run one example at a time.
"""
from __future__ import annotations

import collections
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
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


class _Rows(list):
    """An example type that is itself a list (as nltk.Tree is)."""


_Pair = collections.namedtuple("_Pair", "first second")


def test_one_example_that_is_a_list_or_tuple_subclass_is_refused_as_a_minibatch():
    xs = vectors(3)
    f = db.batched(lambda x: torch.sin(x))
    for one in (_Rows(xs), _Pair(xs[0], xs[1])):
        with pytest.raises(TypeError) as info:
            f(one)
        message = str(info.value)
        assert type(one).__qualname__ in message and "pass a list of examples" in message
        assert "test_api.py" in message, message        # the caller's line
    # plain lists and tuples, tensors, and other sequences remain minibatches
    close(f(list(_Rows(xs))), [torch.sin(x) for x in xs])
    close(f(tuple(_Pair(xs[0], xs[1]))), [torch.sin(x) for x in xs[:2]])
    assert f(range(0)) == []


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
    # linear and tanh per example (the tensors made in the scope are constants)
    assert s.nodes == 10 and s.batches == 2, s


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
    # 8 examples x (linear, tanh, mul, add, sigmoid, sum) + the few reads (the tensors made
    # in the scope are constants, not nodes); per-example execution: ~60 batches
    assert s.nodes >= 48
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
    # per step: the table's row, matmul, add (the zeros and the ids are constants, not
    # nodes): 5 x 3 x 3 nodes, in a batch per op and step
    assert s.nodes == 5 * 9
    assert s.batches <= 9, s


def test_parameters_are_shared_not_stacked():
    torch.manual_seed(6)
    W = nn.Parameter(torch.randn(4, 4))

    def fn(x, W):
        return (W @ x).sum()

    assert_matches_eager(fn, vectors(9, 4), W, atol=ATOL, rtol=RTOL)
    s = db.stats()
    assert s.signatures == 2 and s.batches == 2, s   # matmul, sum: one call each


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
    consts = 0              # the inputs and the zeros are constants, not nodes

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
    consts = 0              # the inputs and the zeros are constants, not nodes
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
    consts = 0              # the inputs and the zeros are constants, not nodes
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
    from dynbatch.plan import index_tensor
    got = index_tensor(values)
    want = torch.tensor(values, dtype=torch.int64)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_index_tensor_of_an_int_too_large_fails_as_torch_does():
    from dynbatch.plan import index_tensor
    with pytest.raises(Exception) as ours:
        index_tensor([2 ** 64])
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


def _lstm_rows_of_one(ex, m):
    h, c = torch.zeros(1, 5), torch.zeros(1, 5)
    for x in ex:
        h, c = m(x.unsqueeze(0), (h, c))
    return h, c


def _gru_rows_of_one(ex, m):
    h = torch.zeros(1, 5)
    for x in ex:
        h = m(x.unsqueeze(0), h)
    return h


def _lstm_rows_of_one_no_state(ex, m):
    return m(ex[0].unsqueeze(0))


@pytest.mark.parametrize("name, module, fn, make, nodes_per_example", [
    # one node per module call: the inputs, the ids and the zeros are constants
    ("Linear", lambda: nn.Linear(4, 5), _linear, lambda i: torch.randn(4), 1),
    ("Linear-2d", lambda: nn.Linear(4, 5), _linear, lambda i: torch.randn(3, 4), 1),
    ("Embedding", lambda: nn.Embedding(7, 5), _embedding, lambda i: [i % 7, (i * 3) % 7], 1),
    ("LayerNorm", lambda: nn.LayerNorm(4), _linear, lambda i: torch.randn(4), 1),
    ("LSTMCell", lambda: nn.LSTMCell(4, 5), _lstm, lambda i: [torch.randn(4)] * 3, 3),
    ("LSTMCell-no-state", lambda: nn.LSTMCell(4, 5), _lstm_no_state,
     lambda i: [torch.randn(4)], 1),
    ("GRUCell", lambda: nn.GRUCell(4, 5), _gru, lambda i: [torch.randn(4)] * 3, 3),
    ("RNNCell", lambda: nn.RNNCell(4, 5), _gru, lambda i: [torch.randn(4)] * 3, 3),
    # cells on rows of one (x.unsqueeze(0), a node each): batched natively, not by vmap
    ("LSTMCell-rows-of-one", lambda: nn.LSTMCell(4, 5), _lstm_rows_of_one,
     lambda i: [torch.randn(4)] * 3, 6),
    ("LSTMCell-rows-of-one-no-state", lambda: nn.LSTMCell(4, 5), _lstm_rows_of_one_no_state,
     lambda i: [torch.randn(4)], 2),
    ("GRUCell-rows-of-one", lambda: nn.GRUCell(4, 5), _gru_rows_of_one,
     lambda i: [torch.randn(4)] * 3, 6),
    ("RNNCell-rows-of-one", lambda: nn.RNNCell(4, 5), _gru_rows_of_one,
     lambda i: [torch.randn(4)] * 3, 6),
])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_builtin_blocks(name, module, fn, make, nodes_per_example, strategy):
    torch.manual_seed(10)
    m = module()
    examples = [make(i) for i in range(5)]
    assert_matches_eager(fn, examples, m, atol=ATOL, rtol=RTOL, strategy=strategy)
    s = db.stats()
    assert s.nodes == 5 * nodes_per_example, s
    assert s.fallbacks == 0 and s.vmap_batches == 0, s
    assert {r.how for r in s.rows() if r.kind == "block"} == {"block"}, s.table()


# -- stats, edge cases ----------------------------------------------------------------------

def test_stats_fields():
    lin = nn.Linear(3, 3)
    db.batched(lambda x, lin: lin(x).sum())(vectors(4, 3), lin)
    s = db.stats()
    for field in ("strategy", "examples", "nodes", "batches", "fallbacks", "vmap_batches",
                  "trace_s", "schedule_s", "execute_s", "signatures"):
        assert hasattr(s, field), field
    assert s.examples == 4 and s.strategy == "agenda"
    assert s.nodes == 8 and s.batches == 2 and s.signatures == 2   # linear, sum
    assert s.fallbacks == 0 and s.vmap_batches == 0
    for t in (s.trace_s, s.schedule_s, s.execute_s):
        assert isinstance(t, float) and 0.0 <= t < 60.0
    assert s.nodes_per_batch == pytest.approx(4.0)
    assert "8 nodes in 2 batches" in str(s)


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
    # each for linear and tanh (the inputs are constants); the sums of stacks of every
    # length are one more (NOTE [stacked sums]), and the stacks themselves never run
    assert s.nodes == 2 * 9 + 3 * 2
    assert s.batches == 2 + 1, s
    # and a nested call inside an autobatch scope joins that scope
    with db.autobatch():
        ys = inner_b([torch.ones(3), torch.zeros(3)], lin)
        assert all(type(y) is db.LazyTensor for y in ys)
    close([y.value for y in ys], [inner(torch.ones(3), lin), inner(torch.zeros(3), lin)])


def test_public_names():
    assert set(db.__all__) == {"batched", "autobatch", "force", "block", "stats",
                               "DataLoader", "LazyTensor"}
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
    assert db.stats().nodes == 3 * 4   # W @ x, tanh, * 2: no dropout node


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
    assert db.stats().nodes == 4 * 4        # W @ x, tanh, the hook's * 3, * 2


def test_a_dropout_module_that_drops_still_drops():
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    outs = db.batched(lambda x: drop(torch.tanh(x)))([torch.ones(100) for _ in range(8)])
    assert db.stats().nodes == 2 * 8                  # tanh, dropout
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
    assert db.stats().nodes == 4 * 64 and db.stats().batches <= 4
    torch.stack(outs).sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


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
