"""Fused patterns (dynbatch/rules/fused.py, NOTE [stacked sums]): a stack summed over all
dims or dim 0 is recorded as one ``stacked_sum`` node whose batches ignore the stack's
length. Every case is checked against eager PyTorch, values and gradients, and for the
batches it takes; the cases the rewrite must leave alone are checked the same way.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynbatch as db
from dynbatch import execute
from dynbatch.rules import fused
from dynbatch.testing import assert_matches_eager

STRATEGIES = ["agenda", "depth"]
LENGTHS = [1, 4, 2, 7, 3, 4]
FUSED_NAMES = {"stack(...).sum()", "stack(...).sum(0)"}


def sequences(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(5, generator=g, dtype=dtype) for _ in range(n)] for n in LENGTHS]


def make_linear(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(5, 5).to(dtype)


def loss_sum(seq, lin):
    return torch.stack([torch.tanh(lin(x)).sum() for x in seq]).sum()


def state_sum0(seq, lin):
    return torch.stack([torch.tanh(lin(x)) for x in seq]).sum(0)


def state_sum_dim_kw(seq, lin):
    return torch.sum(torch.stack([torch.tanh(lin(x)) for x in seq], dim=0), dim=0)


def state_sum_all(seq, lin):
    return torch.sum(torch.stack([torch.tanh(lin(x)) for x in seq], 0))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fn", [loss_sum, state_sum0, state_sum_dim_kw, state_sum_all])
def test_sums_of_stacks_of_every_length_are_one_batch(fn, strategy):
    # linear, tanh (and the per-member sum) are a batch each (the examples' tensors are
    # constants, gathered, not computed); then one batch sums the stacks of all six
    # lengths; the stacks themselves never run
    per_member = 3 if fn is loss_sum else 2
    assert_matches_eager(fn, sequences(), make_linear(), strategy=strategy, atol=1e-6,
                         rtol=1e-5, max_batches=per_member + 1)
    stats = db.stats()
    assert stats.batches == per_member + 1, stats
    assert stats.signatures == per_member + 1, stats
    names = _signatures_of(fn)
    assert len(names) == per_member + 1 and names[-1] in FUSED_NAMES, names
    assert "torch.stack" not in names, names


def test_float64_sums_match_eager_closely():
    assert_matches_eager(loss_sum, sequences(torch.float64), make_linear(torch.float64),
                         atol=1e-12, rtol=1e-12)
    assert db.stats().batches == 4


def stack_returned_too(seq, lin):
    stacked = torch.stack([torch.tanh(lin(x)) for x in seq])
    return stacked.sum(0), stacked


def stack_of_the_examples_tensors(seq, lin):
    # the members are constants (negative ids): gathered as values, still one batch
    return torch.stack(seq).sum(0) + lin(seq[0])


def stack_of_constants_and_nodes(seq, lin):
    # one column mixing constants and computed rows (a cat of both)
    return torch.stack([seq[0]] + [x * 2 for x in seq]).sum(0) + lin(seq[0])


def stack_of_other_outputs(seq, lin):
    # members at outputs 0..4 of a chunk: the gather reads other outputs than the first
    return torch.stack([c for x in seq for c in torch.tanh(lin(x)).chunk(5)]).sum(0)


def sum_over_dim1(seq, lin):
    return torch.stack([torch.tanh(lin(x)) for x in seq]).sum(1)


def stack_on_dim1(seq, lin):
    return torch.stack([torch.tanh(lin(x)) for x in seq], dim=1).sum(0)


def sum_keepdim(seq, lin):
    return torch.stack([torch.tanh(lin(x)) for x in seq]).sum(0, keepdim=True)


def sum_dim_tuple(seq, lin):
    return torch.stack([torch.tanh(lin(x)) for x in seq]).sum((0,))


def sum_with_dtype(seq, lin):
    return torch.stack([torch.tanh(lin(x)) for x in seq]).sum(dtype=torch.float64)


def members_differ_in_grad(seq, lin):
    # an example's tensor (no grad) beside computed ones (grad): two member metas
    return torch.stack([seq[0]] + [torch.tanh(lin(x)) for x in seq]).sum(0)


def stack_read_first(seq, lin):
    stacked = torch.stack([torch.tanh(lin(x)) for x in seq])
    if stacked.max().item() > 10:        # a read: the stack has run before the sum
        return stacked.sum() * 0
    return stacked.sum()


def stack_without_grad(seq, lin):
    members = [torch.tanh(lin(x)) for x in seq]
    with torch.no_grad():
        stacked = torch.stack(members)      # the sum below has no gradient in eager code
    return stacked.sum() + lin(seq[0]).sum()


def sum_without_grad(seq, lin):
    stacked = torch.stack([torch.tanh(lin(x)) for x in seq])
    with torch.no_grad():
        total = stacked.sum()               # another state than the stack's
    return total + lin(seq[0]).sum()


def sum0_without_grad(seq, lin):
    stacked = torch.stack([torch.tanh(lin(x)) for x in seq])
    with torch.no_grad():
        total = stacked.sum(0)              # recorded as written: over dim 0 only
    return total + lin(seq[0])


def half_sum(seq, lin):
    return torch.stack([torch.tanh(lin(x)).half() for x in seq]).sum()


def stack_of_a_view(seq, lin):
    stacked = torch.stack([torch.tanh(lin(x)) for x in seq])
    return stacked[0:].sum(0)               # the sum reads a slice, not the stack


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fn, fused_", [
    (stack_returned_too, True), (stack_of_the_examples_tensors, True),
    (stack_of_constants_and_nodes, True), (stack_of_other_outputs, True),
    (sum_over_dim1, False), (stack_on_dim1, False), (sum_keepdim, False),
    (sum_dim_tuple, False), (sum_with_dtype, False), (members_differ_in_grad, False),
    (stack_read_first, False), (stack_without_grad, False), (sum_without_grad, False),
    (sum0_without_grad, False), (half_sum, False), (stack_of_a_view, False)])
def test_what_the_rewrite_leaves_alone_stays_exact(fn, fused_, strategy):
    # a stack also returned still runs, beside the fused sum; other dims, keepdim, a dtype,
    # members of two metas, a stack already run, a stack made (or summed) in another grad
    # mode (its members must get no gradient) and float16 are recorded as written
    outs = assert_matches_eager(fn, sequences(), make_linear(), strategy=strategy,
                                atol=1e-3 if fn is half_sum else 1e-6, rtol=1e-3)
    assert len(outs) == len(LENGTHS)
    names = _signatures_of(fn, strategy)
    assert bool(FUSED_NAMES & set(names)) == fused_, names
    # the stack runs only when something other than a fused sum reads it
    assert ("torch.stack" in names) == (not fused_ or fn is stack_returned_too), names


def test_fused_batches_ignore_the_stacks_length():
    # a second run with other lengths: the same signatures, as many batches
    lin = make_linear()
    db.batched(state_sum0)(sequences(), lin)
    first = db.stats().batches
    g = torch.Generator().manual_seed(5)
    other = [[torch.randn(5, generator=g, dtype=torch.float32) for _ in range(n)]
             for n in (9, 1, 5, 5, 2, 11)]
    outs = db.batched(state_sum0)(other, lin)
    assert db.stats().batches == first == 3
    for seq, out in zip(other, outs):
        torch.testing.assert_close(out, state_sum0(seq, lin), atol=1e-6, rtol=1e-5)


def test_the_fused_batch_falls_back_per_example_exactly(monkeypatch):
    # the per-example rerun of a failing fused batch (execute._recover) means stacked_sum
    def broken(self, values):
        raise RuntimeError("broken fused batch")
    from dynbatch.signature import GLOBAL
    monkeypatch.setattr(fused.SegmentSum, "batched", broken)
    monkeypatch.setattr(execute, "_warned", set())
    # a fused signature binds its batched call when made: made afresh here, dropped after
    saved = {k: v for k, v in GLOBAL.items() if k[0] is fused.stacked_sum}
    for k in saved:
        del GLOBAL[k]
    try:
        with pytest.warns(RuntimeWarning, match="stack\\(\\.\\.\\.\\)\\.sum\\(0\\)"):
            assert_matches_eager(state_sum0, sequences(), make_linear(), atol=1e-6,
                                 rtol=1e-5)
        assert db.stats().fallbacks == len(LENGTHS)
    finally:
        for k in [k for k in GLOBAL if k[0] is fused.stacked_sum]:
            del GLOBAL[k]
        GLOBAL.update(saved)


def _signatures_of(fn, strategy="agenda"):
    """The names of the signatures of the batches one run of ``fn`` executes, in order."""
    seen = []
    original = execute.execute

    def spy(plan, *args):
        seen.extend(step.sig.name for step in plan.steps)
        return original(plan, *args)
    execute.execute = spy
    try:
        db.batched(fn, strategy=strategy)(sequences(), make_linear())
    finally:
        execute.execute = original
    return seen


def test_in_a_scope_and_read_after():
    lin = make_linear()
    seqs = sequences()
    with db.autobatch():
        sums = [loss_sum(seq, lin) for seq in seqs]
    for got, seq in zip(sums, seqs):
        torch.testing.assert_close(got.value, loss_sum(seq, lin), atol=1e-6, rtol=1e-5)


def test_the_fused_node_reads_the_members_and_the_stack_stays():
    # torch.stack(xs).sum(): the sum is one node that reads the members themselves, recorded
    # after the stack, which stays in the graph and runs only if something else reads it.
    # Either way the graph stays valid and the values are eager's
    lin = make_linear()
    seq = sequences()[3]
    with db.autobatch() as run:
        members = [torch.tanh(lin(x)) for x in seq]
        member_ids = tuple(m.node.id for m in members)
        total = torch.stack(members).sum()
        nodes = run.graph.nodes
        assert nodes[-1] is total.node and total.node.sig.name == "stack(...).sum()"
        assert nodes[-1].sig.fused is not None
        assert nodes[-2].sig.fn is getattr(torch.stack, "__wrapped__", torch.stack)
        assert nodes[-2].inputs == total.node.inputs == member_ids
        run.graph.lint()
        stacked = torch.stack(members)
        doubled = stacked * 2
        other = stacked.sum(0)
        assert nodes[-1] is other.node and nodes[-3] is stacked.node
        assert other.node.sig.name == "stack(...).sum(0)" and other.node.inputs == member_ids
        assert doubled.node.inputs == (stacked.node.id,)
        run.graph.lint()
    # tanh, the fused sum(), the fused sum(0), the stack (read by *2), *2
    assert db.stats().batches == 5
    eager = [torch.tanh(lin(x)) for x in seq]
    torch.testing.assert_close(total.value, torch.stack(eager).sum(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(other.value, torch.stack(eager).sum(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(doubled.value, torch.stack(eager) * 2)
