"""Recording (trace.py, intercept.py, codegen.py's call-site recorders, graph.py).

What a run records is checked on its graph, while the run is open: the call-site
recorders (NOTE [call sites]) must record exactly the nodes the general path records;
torch calls made with no per-example input become constants; the functions patched while
a run records are restored when it ends, however it ends.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch import intercept, session, trace
from dynbatch.graph import Constant, Node

DIM = 5


def recorded(fn, examples, args=(), sites: bool = True):
    """(node summaries, graph text, the run's call-site table) of tracing ``fn`` over
    ``examples``; nothing executes. ``sites=False``: every call takes the general path."""
    run = session.Run("agenda", examples=len(examples))
    run.planning = True
    if not sites:
        run.remember = lambda *a: None
    with run:
        run.trace_examples(fn, (), list(examples), tuple(args), {})
        graph = run.graph
        graph.lint()
        number: dict = {}       # signatures by order of first use: block ones live per run
        nodes = [(number.setdefault(n.sig, len(number)), n.sig.name, n.inputs, n.outs, n.site,
                  graph.example_of(n.id)) for n in graph.nodes]
        text = str(graph)
        table = {code: dict(lines) for code, lines in run.sites.items()}
    return nodes, text, table


def sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(DIM, generator=g) for _ in range(n)] for n in lengths]


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2 * DIM, 2 * DIM)

    def forward(self, xs):
        h, c = torch.zeros(DIM), torch.zeros(DIM)
        for x in xs:
            gates = self.lin(torch.cat([x, h]))
            i, o = gates.chunk(2)
            c = c * torch.sigmoid(i) + x.tanh()
            h = torch.sigmoid(o) * torch.tanh(c)
            h = h + 0.5 * x
        return F.softmax(h, -1).sum()


def test_call_site_recorders_record_what_the_general_path_records():
    model, examples = Cell(), sequences([4, 1, 6, 3, 6])
    fast, fast_text, table = recorded(lambda xs, m: m(xs), examples, (model,))
    slow, slow_text, _ = recorded(lambda xs, m: m(xs), examples, (model,), sites=False)
    assert fast == slow and fast_text == slow_text
    compiled = [r for lines in table.values() for r in lines.values() if callable(r)]
    assert compiled, "the loop's lines were compiled into recorders"


def test_a_line_whose_call_keeps_changing_is_recorded_the_general_way():
    shapes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]

    def fn(n, w):
        total = torch.zeros(())
        for k in shapes[:n]:
            total = total + (w[:k] * 2).sum()       # a new meta on every iteration
        return total

    nodes, _, table = recorded(fn, [12, 12], (torch.randn(12),))
    slow, _, _ = recorded(fn, [12, 12], (torch.randn(12),), sites=False)
    assert nodes == slow
    states = [r for lines in table.values() for r in lines.values()]
    assert any(type(r) is list and r[1] >= trace._SITE_CHANGES for r in states), states


def test_calls_on_no_per_example_tensor_become_constants():
    w = torch.randn(DIM)

    def fn(x, w):
        zeros = torch.zeros(DIM)                # made inside: per-example data
        wt = w * 2                              # shared only: runs eagerly, a constant
        label = torch.tensor(3)                 # a Python scalar: a constant kept as 3
        return (x + zeros + wt).sum() + label

    run = session.Run("agenda", examples=2)
    run.planning = True
    with run:
        run.trace_examples(fn, (), [torch.randn(DIM), torch.randn(DIM)], (w,), {})
        constants = run.graph.constants
        assert all(type(c) is Constant for c in constants)
        assert any(c.value == 3 for c in constants if not isinstance(c.value, torch.Tensor))
        assert any(isinstance(c.value, torch.Tensor) and torch.equal(c.value, w * 2)
                   for c in constants)
        assert all(type(n) is Node for n in run.graph.nodes)
        calls = [n.sig.name for n in run.graph.nodes]
    assert not any("zeros" in name or "mul" in name for name in calls), calls


def test_word_ids_share_a_constant_and_each_call_gets_its_own_lazy_tensor():
    def fn(word, table):
        a, b = torch.tensor(word), torch.tensor(word)
        assert a is not b
        b += 1                                  # in place on one: the other is untouched
        return table[a] + table[b]

    table = torch.randn(10, DIM)
    out = db.batched(fn)([1, 2, 1], table)
    for word, got in zip([1, 2, 1], out):
        torch.testing.assert_close(got, table[word] + table[word + 1])


def test_patched_functions_are_restored_when_a_run_ends_or_fails():
    originals = {name: getattr(torch, name) for name in ("cat", "tensor", "stack")}
    apply = torch.autograd.Function.apply

    def fails(x):
        torch.cat([x, x])
        raise ValueError("user error")

    with pytest.raises(ValueError, match="user error"):
        db.batched(fails)([torch.randn(2), torch.randn(2)])
    db.batched(lambda x: torch.cat([x, x]))([torch.randn(2)])
    assert {name: getattr(torch, name) for name in originals} == originals
    assert torch.autograd.Function.apply == apply


def test_another_thread_gets_plain_torch_while_a_run_records():
    seen = {}
    started, done = threading.Event(), threading.Event()

    def other():
        started.wait()
        x = torch.ones(3)
        seen["type"] = type(torch.cat([x, x]))
        done.set()

    def fn(x):
        started.set()
        done.wait(30)
        return x * 2

    thread = threading.Thread(target=other)
    thread.start()
    db.batched(fn)([torch.randn(3)])
    thread.join()
    assert seen["type"] is torch.Tensor


def test_a_dropout_that_drops_nothing_records_nothing():
    drop = nn.Dropout(0.3).eval()

    def fn(x):
        return F.dropout(x, 0.0) + drop(x) + F.dropout(x, 0.5, training=False)

    nodes, _, _ = recorded(fn, [torch.randn(DIM), torch.randn(DIM)])
    assert [n[1] for n in nodes].count("F.dropout") == 0
    assert len(nodes) == 2 * 2                  # two additions per example


def test_metadata_is_answered_without_recording():
    def fn(x):
        assert x.shape == (DIM,) and x.dim() == 1 and x.dtype == torch.float64
        assert x.size(0) == DIM and x.numel() == DIM and x.is_floating_point()
        return x * 2

    nodes, _, _ = recorded(fn, [torch.randn(DIM)] * 3)
    assert len(nodes) == 3


def test_intercept_sends_shared_only_calls_to_eager():
    assert intercept.holds_lazy((1, [2, 3]), {"a": None}) is False


def test_graph_text_names_example_and_line():
    _, text, _ = recorded(lambda x: (x * 2).sum(), [torch.randn(3), torch.randn(3)])
    assert "examples[1]" in text and "test_trace.py:" in text
