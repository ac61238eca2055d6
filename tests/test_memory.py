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


ENGINE_TYPES = (graph.Node, graph.Graph, lazy.LazyTensor, trace.Run)


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
