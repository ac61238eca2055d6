"""Memory does not grow over many runs: every run's nodes, constants, lazy tensors, graph and
run-local signatures are freed when it ends, failed runs included; the cross-run signature
caches stay bounded; the process RSS levels off. While a run executes, batch outputs that
nothing can read any more are dropped (``Step.frees``, plan.py); lazy tensors the user
keeps after a run keep only the batch outputs they lie in.
"""
from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from torch import nn

import dynbatch as db
from dynbatch import execute, graph, lazy, session, signature
from dynbatch.errors import DynbatchError, ExecuteError, TraceError

try:
    import greenlet
except ImportError:         # pragma: no cover - a declared dependency
    greenlet = None

PAGE = os.sysconf("SC_PAGE_SIZE")
RUNS = 600


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def live(*types) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in types)


def engine_types() -> tuple:
    """What a run makes and must free at its end (looked up now: the engine may be reloaded)."""
    types = (graph.Node, graph.Constant, graph.Graph, lazy.LazyTensor, session.Run,
             signature.Signature)
    return types + ((greenlet.greenlet,) if greenlet is not None else ())


def cache_sizes() -> tuple[int, int]:
    return len(signature.GLOBAL), len(signature._INFERRED)


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


def test_no_growth_over_many_runs():
    torch.manual_seed(0)
    model = Tiny()
    one_run(model, 0)
    baseline = live(*engine_types())
    sizes = rss_100 = None
    for step in range(1, RUNS + 1):
        one_run(model, step)
        if step == 20:
            sizes = cache_sizes()
        if step == 100:
            gc.collect()
            rss_100 = rss_bytes()
            assert live(*engine_types()) == baseline
    assert db.stats().examples == 4 and db.stats().nodes > 0
    assert live(*engine_types()) == baseline, "nodes / lazy tensors / runs outlive their run"
    assert cache_sizes() == sizes, "signature caches grow per run"
    gc.collect()
    grown = rss_bytes() - rss_100
    assert grown < 8 * 2 ** 20, f"RSS grew {grown / 2 ** 20:.1f} MiB from run 100 to {RUNS}"


def test_no_growth_with_blocks():
    # a user block's signature (its traced body, compiled) is made per run: freed with it
    torch.manual_seed(1)
    model = WithBlocks()
    one_run(model, 0)
    one_run(model, 1)
    baseline = live(*engine_types())
    sizes = cache_sizes()
    for step in range(2, 102):
        one_run(model, step)
    assert db.stats().batches > 0
    assert live(*engine_types()) == baseline
    assert cache_sizes() == sizes


def _chain(x):
    for _ in range(50):
        x = torch.tanh(x) * 0.5 + x
    return x


def test_nodes_keep_no_lazy_tensors_so_a_chain_frees_them_while_recording():
    # A node names its inputs by id and keeps no arguments (graph.py), so the lazy tensors
    # of a long per-op chain die as the code moves on; a node that kept its arguments
    # would keep one alive per node until the run ended.
    counts = []

    def chain(x):
        x = _chain(x)
        counts.append(live(lazy.LazyTensor))
        return x.sum()

    xs = [torch.randn(3) for _ in range(4)]
    outs = db.batched(chain)(xs)
    nodes = db.stats().nodes
    assert nodes >= 4 * 150
    # each example sees its own chain's end and a few per other example: not one per node
    assert max(counts) < 20, f"{max(counts)} lazy tensors alive over {nodes} nodes"
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, _chain(x).sum())


def test_signature_templates_hold_no_lazy_tensors():
    # A template's lazy tensors would keep their nodes, and through them whole batch
    # outputs, alive as long as the signature is cached; the batched call gets the values
    # in the places of its Input markers.
    from torch.utils._pytree import tree_flatten
    seen = []

    def chain(x, w):
        y = torch.tanh(x) * 0.5 + x
        y = torch.add(y, w, alpha=2.0)          # names a shared tensor: a run-local key
        run = lazy.current.tracer
        sigs = list(run.signatures.values()) + list(signature.GLOBAL.values()) + \
            list(signature._INFERRED.values())
        for sig in sigs:
            seen.extend(tree_flatten(sig.template)[0])
        return y.sum()

    xs = [torch.randn(3) for _ in range(2)]
    w = torch.randn(3)
    outs = db.batched(chain)(xs, w)
    assert len(seen) >= 4 and any(a is w for a in seen)
    assert any(type(a) is float and a == 0.5 for a in seen)
    assert any(type(a) is lazy.Input for a in seen)
    assert not any(type(a) is lazy.LazyTensor for a in seen)
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, ((torch.tanh(x) * 0.5 + x) + 2.0 * w).sum())


def _bad(x):
    y = torch.tanh(x) * 2
    if x.shape[0] == 3:
        raise ValueError("boom")
    return y


def _bad_after_a_read(x):
    y = torch.tanh(x) * 2
    if y.sum().item() > -1e9 and x.shape[0] == 3:      # the other example is suspended
        raise ValueError("boom after a read")
    return y


def _bad_at_execution(i):
    # fake tensors cannot see an index out of range: it fails when the batch runs
    table = torch.randn(4, 2)
    return torch.nn.functional.embedding(i, table) * 2.0


def _fail_every_way():
    with pytest.raises(ValueError):
        db.batched(_bad)([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError):
        db.batched(_bad_after_a_read)([torch.ones(2), torch.ones(3), torch.ones(2)])
    with pytest.raises(TraceError):         # at recording
        db.batched(lambda x: torch.cat([x, torch.ones(2, 2)]))([torch.ones(2)])
    with pytest.raises(ExecuteError):       # at execution
        db.batched(_bad_at_execution)([torch.tensor(1), torch.tensor(9)])
    with pytest.raises(ValueError), db.autobatch():
        ys = [torch.tanh(torch.tensor([float(i)])) for i in range(3)]
        raise ValueError(f"boom in a scope, {len(ys)} values pending")


def test_no_leak_from_failed_runs():
    _fail_every_way()       # the signatures of every call, cached across runs, made once
    baseline = live(*engine_types())
    for _ in range(30):
        _fail_every_way()
    assert live(*engine_types()) == baseline


def test_no_leak_from_scopes():
    def scope():
        with db.autobatch():
            ys = [torch.tanh(torch.tensor([float(i), 1.0])) for i in range(4)]
        return [y.value for y in ys]

    scope()
    baseline = live(*engine_types())
    for _ in range(100):
        values = scope()
    assert all(type(v) is torch.Tensor for v in values)
    del values
    assert live(*engine_types()) == baseline


def test_signature_caches_bounded_with_fresh_shared_tensors():
    # A shared tensor made anew for every minibatch (class weights, a mask computed outside)
    # takes part in keys by identity: such keys live for one run (Tracer.signatures), and
    # what they infer is kept by meta (signature._INFERRED), so a new identity each run
    # adds no cache entries.
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
            sizes.append(cache_sizes())
    assert sizes[1] == sizes[0], f"caches grew from {sizes[0]} to {sizes[1]} in 179 runs"


def test_signature_caches_are_cleared_past_their_limit(monkeypatch):
    # keys that differ every run (a new scalar, a shared tensor's new facts) must not grow
    # the process-wide caches without bound: each is cleared once past signature._LIMIT
    limit = 40
    monkeypatch.setattr(signature, "_LIMIT", limit)
    w = torch.randn(3)

    def fn(x, scale):
        return torch.add(x * scale, w, alpha=scale).sum()     # plain key; a shared one

    most = [0, 0]
    for step in range(3 * limit):
        xs = [torch.randn(3) for _ in range(2)]
        scale = 1.0 + step / 7
        outs = db.batched(fn)(xs, scale)
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, torch.add(x * scale, w, alpha=scale).sum())
        most = [max(m, n) for m, n in zip(most, cache_sizes())]
    assert most[0] <= limit + 1 and most[1] <= limit + 1, most
    assert most[1] > limit // 2, most       # the shared key's facts were cached meanwhile


def _watch_store(monkeypatch):
    """As each step of a run is about to run, which earlier batch outputs are still alive,
    through weak references to their tensors ({store number: shape of the first output});
    and which the store still names (store numbers)."""
    refs, alive_at, named_at = [], [], []
    original = execute.gather_inputs

    def gather_inputs(step, store):
        for out in store[len(refs):]:
            refs.append([weakref.ref(t) for t in out] if out is not None else [])
        alive_at.append({k: tuple(rs[0]().shape) for k, rs in enumerate(refs)
                         if any(r() is not None for r in rs)})
        named_at.append({k for k, out in enumerate(store) if out is not None})
        return original(step, store)

    monkeypatch.setattr(execute, "gather_inputs", gather_inputs)
    return refs, alive_at, named_at


def _chain_of_adds(x):
    # an add keeps neither input for its backward: once the next add has read a value,
    # only dynbatch's store could keep it alive
    for k in range(6):
        x = x + float(k)
    return (x * x).sum()


def _chain_with_a_read(x):
    for k in range(3):
        x = x + float(k)
    if x.sum().item() > 1e9:        # a read: what it needs runs, the rest later
        x = x * 0
    for k in range(3):
        x = x + float(k)
    return (x * x).sum()


@pytest.mark.parametrize("fn", [_chain_of_adds, _chain_with_a_read])
def test_values_no_reader_needs_are_freed_while_the_run_executes(monkeypatch, fn):
    # without Step.frees every intermediate batch output lived until the run ended
    refs, alive_at, named_at = _watch_store(monkeypatch)
    xs = [torch.randn(5, requires_grad=True) for _ in range(4)]
    outs = db.batched(fn)(xs)
    assert db.stats().batches >= 7 and len(alive_at) == db.stats().batches
    assert (db.stats().rounds > 0) == (fn is _chain_with_a_read)
    # by the last batch, the early adds' outputs are gone: at most the last few live
    assert len(alive_at[-1]) <= 3, alive_at[-1]
    assert not {0, 1, 2} & alive_at[-1].keys(), alive_at
    # as the last step runs, the store names only the batch it reads (and the one before);
    # once the run has returned, no more than those live (the results, the values
    # autograd saved for the backward of x * x)
    n = db.stats().batches
    assert named_at[-1] <= {n - 3, n - 2}, named_at
    alive = {k for k, rs in enumerate(refs) if any(r() is not None for r in rs)}
    assert alive <= {n - 3, n - 2}, alive
    torch.stack(outs).sum().backward()
    for x, out in zip(xs, outs):
        y = x.detach().clone().requires_grad_()
        expected = fn(y)
        expected.backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x.grad, y.grad)


def test_values_held_at_a_read_are_freed_once_nothing_holds_them(monkeypatch):
    # Greedy decoding: each step's logits are held (a local variable) when its argmax is
    # read, so that read's plan keeps them; no later node reads them, and once the code
    # has moved on nothing holds them: a later plan must drop them, or the run keeps one
    # batch of logits per step until it ends (eager code keeps one at a time).
    _, alive_at, named_at = _watch_store(monkeypatch)
    torch.manual_seed(0)
    lin = nn.Linear(4, 50)
    emb = torch.randn(50, 4)
    steps = 12

    def decode(h):
        tokens = []
        for _ in range(steps):
            logits = lin(h)
            token = logits.argmax().item()
            tokens.append(token)
            h = torch.tanh(h + emb[token])
        return h.sum(), tokens

    hs = [torch.randn(4) for _ in range(6)]
    outs = db.batched(decode)(hs)
    assert db.stats().rounds == steps
    for h, (total, tokens) in zip(hs, outs):
        expected, expected_tokens = decode(h)
        assert tokens == expected_tokens
        torch.testing.assert_close(total, expected)
    # the batches of logits alive as the last step runs
    logits_alive = [k for k, shape in alive_at[-1].items() if shape == (len(hs), 50)]
    assert len(logits_alive) <= 2, f"{len(logits_alive)} batches of logits alive " \
        f"after {steps} steps: store entries {sorted(named_at[-1])}"


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


def test_lazies_kept_after_a_run_keep_only_their_batch_outputs():
    # After the scope the user holds only the last values of a chain: the closed run keeps
    # its store and placement for them, and nothing else (no graph, no other node, no
    # other batch output).
    nodes_before = live(graph.Node)
    xs = [torch.tensor([float(i), 1.0]) for i in range(4)]
    with db.autobatch() as run:
        ys = xs
        for k in range(5):
            ys = [torch.tanh(y) * 0.5 + float(k) for y in ys]
        middle = ys[0] * 3.0            # dropped at once: computed for no one
        del middle
        ends = ys
        del ys
    assert run.closed and run.graph.nodes == [] and run.graph.constants == []
    held = {e.node.id for e in ends}
    batches = {run.graph.batch_of[i] for i in held}
    assert len(batches) == 1
    named = {k for k, out in enumerate(run.store) if out is not None}
    assert named == batches, (named, batches, len(run.store))
    assert live(graph.Node) - nodes_before == len(held)
    assert live(graph.Constant) == 0        # the examples' tensors: the graph's only
    for x, e in zip(xs, ends):
        expected = x
        for k in range(5):
            expected = torch.tanh(expected) * 0.5 + float(k)
        torch.testing.assert_close(e.value, expected)
    store = weakref.ref(run.store[batches.pop()][0])
    del run, ends, e
    gc.collect()
    assert store() is None and live(graph.Node) == nodes_before


def test_reading_a_freed_value_is_an_error_not_a_wrong_value():
    # a store entry dropped while a lazy tensor still needs it (which the plan never does)
    # must not read as some other value
    with db.autobatch() as run:
        y = torch.tanh(torch.tensor([1.0, 2.0])) * 2.0
    run.store[run.graph.batch_of[y.node.id]] = None
    with pytest.raises(DynbatchError):
        print(y.value)


def test_a_closed_run_is_freed_by_reference_counting_alone():
    # At close the run drops its graph's lists of nodes and constants, which point back at
    # it: left as a cycle they wait for the next full collection (the collector is off
    # while a run records), and pin the memory the graph leaves through the backward pass.
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
        values = [y.value for y in ys] + [loss.value for loss in losses]
        assert len(values) == 10
        del ys, labels, losses, values
        assert ref() is None
        # and a @batched call, whose results are real tensors: its run is gone on return
        refs = []
        original = session.Run.__init__

        def init(self, *args, **kwargs):
            refs.append(weakref.ref(self))
            original(self, *args, **kwargs)
        session.Run.__init__ = init
        try:
            outs = _doubled_tanh_sum([torch.randn(4) for _ in range(3)])
        finally:
            session.Run.__init__ = original
        assert len(outs) == 3 and len(refs) == 1 and refs[0]() is None
    finally:
        if enabled:
            gc.enable()


@db.batched
def _doubled_tanh_sum(x):
    return torch.tanh(x * 2.0).sum()


def test_a_large_run_empties_the_free_lists_once_its_graph_is_freed(monkeypatch):
    # NOTE [free lists at close] (session.py): after the graph is freed, not before (its
    # tuples would refill the lists), a collection with every object frozen, undone at once
    nodes = (graph.Node,)
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
        monkeypatch.setattr(session, "_FREE_LISTS_MIN_NODES", min_nodes)
        seen.clear()
        ys = _doubled_tanh_sum(xs)
        torch.testing.assert_close(torch.stack(ys), torch.tanh(torch.stack(xs) * 2).sum(1))
        assert db.stats().nodes >= 8
        assert seen == expected
        assert (db.stats().free_lists_s > 0) == bool(expected)
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_itself_keeps_them_frozen(monkeypatch):
    monkeypatch.setattr(session, "_FREE_LISTS_MIN_NODES", 1)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        _doubled_tanh_sum([torch.randn(4) for _ in range(4)])
        assert gc.get_freeze_count() > 0.9 * frozen   # a few frozen objects die meanwhile
        assert db.stats().free_lists_s == 0
    finally:
        gc.unfreeze()


def test_a_failed_run_does_not_empty_the_free_lists_or_publish(monkeypatch):
    monkeypatch.setattr(session, "_FREE_LISTS_MIN_NODES", 1)
    _doubled_tanh_sum([torch.randn(4) for _ in range(2)])
    last = db.stats()
    collected = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(a) or collect(*a))
    with pytest.raises(ValueError):
        db.batched(_bad)([torch.ones(2), torch.ones(3)])
    assert collected == [] and db.stats() is last
