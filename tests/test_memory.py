"""Memory does not grow over many runs: every run's nodes, lazy tensors and graph are freed
when it ends; the cross-run signature cache stays bounded; the process RSS levels off.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

import dynbatch as db
from dynbatch import graph, lazy, signature, trace
from dynbatch.errors import DynbatchError

PAGE = os.sysconf("SC_PAGE_SIZE")
RUNS = 1000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def live(*types) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in types)


ENGINE_TYPES = (graph.Node, graph.ArgsNode, graph.CallNode, graph.Immediate, graph.Graph,
                lazy.LazyTensor, trace.Run)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @db.batched
    def forward(self, x):
        return torch.tanh(self.lin(x)).sum()


class WithBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cell = db.block(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))

    @db.batched
    def forward(self, seq):
        h = torch.zeros(4)
        for x in seq:
            h = self.cell(self.lin(x) + h)
        return h.sum()


def one_run(model, step):
    g = torch.Generator().manual_seed(step)
    if isinstance(model, Tiny):
        examples = [torch.randn(4, generator=g) for _ in range(4)]
    else:
        examples = [[torch.randn(4, generator=g) for _ in range(1 + (step + k) % 3)]
                    for k in range(4)]
    losses = model(examples)
    torch.stack(losses).sum().backward()
    model.zero_grad(set_to_none=True)


def test_no_growth_over_1000_runs():
    torch.manual_seed(0)
    model = Tiny()
    one_run(model, 0)
    baseline = live(*ENGINE_TYPES)
    signatures = rss_200 = None
    for step in range(1, RUNS + 1):
        one_run(model, step)
        if step == 20:
            signatures = len(signature.GLOBAL_SIGNATURES)
        if step == 200:
            gc.collect()
            rss_200 = rss_bytes()
            assert live(*ENGINE_TYPES) == baseline
    assert db.stats().examples == 4 and db.stats().nodes > 0
    assert live(*ENGINE_TYPES) == baseline, "nodes / lazy tensors / runs outlive their run"
    assert len(signature.GLOBAL_SIGNATURES) == signatures, "signature cache grows per run"
    gc.collect()
    grown = rss_bytes() - rss_200
    assert grown < 8 * 2 ** 20, f"RSS grew {grown / 2 ** 20:.1f} MiB from run 200 to {RUNS}"


def test_no_growth_with_blocks():
    # user blocks keep per-run signatures and a traced body program: freed with the run
    torch.manual_seed(1)
    model = WithBlocks()
    one_run(model, 0)
    baseline = live(*ENGINE_TYPES)
    signatures = len(signature.GLOBAL_SIGNATURES)
    for step in range(1, 101):
        one_run(model, step)
    assert live(*ENGINE_TYPES) == baseline
    assert len(signature.GLOBAL_SIGNATURES) == signatures


def test_plain_nodes_free_their_lazy_tensors_while_recording():
    # NOTE [plain nodes]: f(x), f(x, y), f(x, 2.0) on earlier outputs keep no arguments,
    # so the lazy tensors of a long per-op chain die as the code moves on; a node that
    # kept its args would keep one alive per node until it ran.
    counts = []

    def chain(x):
        for _ in range(50):
            x = torch.tanh(x) * 0.5 + x
        counts.append(live(lazy.LazyTensor))
        return x.sum()

    xs = [torch.randn(3) for _ in range(4)]
    outs = db.batched(chain)(xs)
    nodes = db.stats().nodes
    assert nodes >= 4 * 150
    # the last example sees every example's recording: a few templates and its own x
    assert max(counts) < 20, f"{max(counts)} lazy tensors alive over {nodes} nodes"
    for x, out in zip(xs, outs):
        assert torch.allclose(out, _eager_chain(x))


def test_plain_node_templates_hold_no_lazy_tensors():
    # A template's lazy tensors would keep their nodes, and through them whole batch
    # outputs, alive until the run ends; the executor fills those places itself.
    seen = []

    def chain(x):
        x = torch.tanh(x) * 0.5 + x
        run = trace.current_run()
        seen.extend(a for args in run.templates.values() for a in args)
        return x.sum()

    xs = [torch.randn(3) for _ in range(2)]
    outs = db.batched(chain)(xs)
    assert len(seen) >= 4 and 0.5 in seen
    assert not any(type(a) is lazy.LazyTensor for a in seen)
    for x, out in zip(xs, outs):
        assert torch.allclose(out, (torch.tanh(x) * 0.5 + x).sum())


def _eager_chain(x):
    for _ in range(50):
        x = torch.tanh(x) * 0.5 + x
    return x.sum()


def test_no_node_leak_from_failed_runs():
    def bad(x):
        y = torch.tanh(x) * 2
        if x.shape[0] == 3:
            raise ValueError("boom")
        return y

    db.batched(bad)([torch.ones(2)])
    baseline = live(*ENGINE_TYPES)
    for _ in range(50):
        with pytest.raises(ValueError):
            db.batched(bad)([torch.ones(2), torch.ones(3)])
        with pytest.raises(DynbatchError):
            db.batched(lambda x: torch.cat([x, torch.ones(2, 2)]))([torch.ones(2)])
    assert live(*ENGINE_TYPES) == baseline


def test_no_node_leak_from_scopes():
    def scope():
        with db.autobatch():
            ys = [torch.tanh(torch.tensor([float(i), 1.0])) for i in range(4)]
        return [y.value for y in ys]

    scope()
    baseline = live(*ENGINE_TYPES)
    for _ in range(100):
        values = scope()
    assert all(type(v) is torch.Tensor for v in values)
    del values
    assert live(*ENGINE_TYPES) == baseline


def test_signature_cache_bounded_with_fresh_shared_tensors():
    # A shared tensor made anew for every minibatch (class weights, a mask computed outside)
    # takes part in signatures by identity: a new identity each run must not add cache
    # entries forever.
    lin = nn.Linear(4, 4)

    def fn(x, lin, w):
        return (torch.tanh(lin(x)) * w).sum()

    keep = []
    sizes = []
    for step in range(200):
        w = torch.randn(4)
        keep.append(torch.randn(4))         # vary the allocator so ids are not reused
        db.batched(fn)([torch.randn(4) for _ in range(4)], lin, w)
        if step in (20, 199):
            sizes.append(len(signature.GLOBAL_SIGNATURES))
    assert sizes[1] - sizes[0] < 20, f"cache grew {sizes[1] - sizes[0]} entries in 179 runs"


def _watch_batches(monkeypatch):
    """Weak references to every batch's outputs as it is stored, and, as each batch is
    about to run, which earlier batch outputs are still alive (by batch number)."""
    import weakref
    from dynbatch import execute
    stored, alive_at = [], []
    original_store, original_run = execute._store, execute.run_batch

    def store(nodes, out):
        stored.append([weakref.ref(t) for t in out])
        original_store(nodes, out)

    def run_batch(nodes, info):
        alive_at.append({k for k, refs in enumerate(stored)
                         if any(r() is not None for r in refs)})
        original_run(nodes, info)

    monkeypatch.setattr(execute, "_store", store)
    monkeypatch.setattr(execute, "run_batch", run_batch)
    return stored, alive_at


def _chain_of_adds(x):
    # an add keeps neither input for its backward: once the next add has read a value,
    # only dynbatch's graph could keep it alive
    for k in range(6):
        x = x + float(k)
    return (x * x).sum()


def test_values_no_reader_needs_are_freed_while_the_run_executes(monkeypatch):
    # NOTE [freeing]: without it every intermediate batch output lived until the run ended
    stored, alive_at = _watch_batches(monkeypatch)
    xs = [torch.randn(5, requires_grad=True) for _ in range(4)]
    outs = db.batched(_chain_of_adds)(xs)
    assert len(stored) >= 7 and len(alive_at) == len(stored)
    # by the last batch, the early adds' outputs are gone: at most the last few live
    assert len(alive_at[-1]) <= 3, alive_at[-1]
    assert 1 not in alive_at[-1] and 2 not in alive_at[-1]
    torch.stack(outs).sum().backward()
    for x, out in zip(xs, outs):
        y = x.detach().clone().requires_grad_()
        expected = _chain_of_adds(y)
        expected.backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x.grad, y.grad)


STASH = []


def _stashing_chain(x):
    y = x + 1.0
    STASH.append(y)             # a lazy tensor escapes the run: it must stay readable
    return (y + 2.0).sum()


def test_a_value_still_held_is_not_freed():
    STASH.clear()
    xs = [torch.randn(3) for _ in range(3)]
    outs = db.batched(_stashing_chain)(xs)
    for x, y, out in zip(xs, STASH, outs):
        torch.testing.assert_close(y.value, x + 1.0)
        torch.testing.assert_close(out, (x + 3.0).sum())
    STASH.clear()
    # in a scope the user's own variables hold values across reads and the scope's end
    with db.autobatch():
        firsts = [torch.tensor([float(i)]) + 1.0 for i in range(3)]
        seconds = [f * 2.0 for f in firsts]
        assert seconds[1].item() == 4.0          # executes everything pending
        thirds = [f + s for f, s in zip(firsts, seconds)]    # reads firsts again
    assert [f.value.item() for f in firsts] == [1.0, 2.0, 3.0]
    assert [t.value.item() for t in thirds] == [3.0, 6.0, 9.0]


def test_a_result_that_another_node_reads_is_not_freed():
    def both(x):
        y = torch.tanh(x)
        return y, (y * 3.0).sum()

    xs = [torch.randn(4) for _ in range(3)]
    outs = db.batched(both)(xs)
    for x, (y, s) in zip(xs, outs):
        torch.testing.assert_close(y, torch.tanh(x))
        torch.testing.assert_close(s, (torch.tanh(x) * 3.0).sum())


def test_reading_a_freed_value_is_an_error_not_a_wrong_value():
    from dynbatch import execute
    with pytest.raises(RuntimeError, match="NOTE \\[freeing\\]"):
        execute.FREED[0]


def test_a_closed_run_is_freed_by_reference_counting_alone():
    # At close the run drops its shared immediates, which point back at it: left as a
    # cycle they wait for the next full collection (the collector is off while a run
    # traces), and pin the memory the graph leaves through the backward pass.
    import weakref
    enabled = gc.isenabled()
    gc.disable()
    try:
        with db.autobatch() as run:
            ys = [torch.tanh(torch.tensor(float(i)) * 2.0) + torch.tensor(i % 3)
                  for i in range(5)]
            labels = [torch.tensor([i % 2]) for i in range(5)]
            losses = [torch.nn.functional.cross_entropy(torch.stack([y, -y]).unsqueeze(0), t)
                      for y, t in zip(ys, labels)]
        ref = weakref.ref(run)
        del run
        values = [y.value for y in ys] + [l.value for l in losses]
        assert len(values) == 10
        del ys, labels, losses, values
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


@db.batched
def _doubled_tanh_sum(x):
    return torch.tanh(x * 2.0).sum()


def test_a_large_run_empties_the_free_lists_once_its_graph_is_freed(monkeypatch):
    # NOTE [free lists at close]: after the graph is freed, not before (its tuples would
    # refill the lists), a collection with every object frozen, undone at once
    from dynbatch import api
    nodes = (graph.Node, graph.ArgsNode, graph.CallNode)
    before = live(*nodes)
    seen = []
    freeze, collect = gc.freeze, gc.collect

    def freeze_spy():
        seen.append(("freeze", sum(1 for o in gc.get_objects() if type(o) in nodes)))
        freeze()

    def collect_spy(*args):
        seen.append(("collect", gc.get_freeze_count() > 0))
        return collect(*args)
    monkeypatch.setattr(gc, "freeze", freeze_spy)
    monkeypatch.setattr(gc, "collect", collect_spy)
    xs = [torch.randn(4) for _ in range(8)]
    for min_nodes, expected in ((10_000, []), (1, [("freeze", before), ("collect", True)])):
        monkeypatch.setattr(api, "_FREE_LISTS_MIN_NODES", min_nodes)
        seen.clear()
        ys = _doubled_tanh_sum(xs)
        torch.testing.assert_close(torch.stack(ys), torch.tanh(torch.stack(xs) * 2).sum(1))
        assert db.stats().nodes >= 8
        assert seen == expected
        assert (db.stats().free_lists_s > 0) == bool(expected)
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_itself_keeps_them_frozen(monkeypatch):
    from dynbatch import api
    monkeypatch.setattr(api, "_FREE_LISTS_MIN_NODES", 1)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        _doubled_tanh_sum([torch.randn(4) for _ in range(4)])
        assert gc.get_freeze_count() > 0.9 * frozen   # a few frozen objects die meanwhile
        assert db.stats().free_lists_s == 0
    finally:
        gc.unfreeze()
