"""Record-time rewrites (dynbatch/fusion.py): a stack summed over all dims or dim 0 becomes one
node whose batches ignore the stack's length. Every case is checked against eager PyTorch,
values and gradients, and for the batches it takes; the cases the rewrite must leave alone
are checked the same way.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynbatch as db
from dynbatch.graph import input_ids
from dynbatch.testing import assert_matches_eager

STRATEGIES = ["agenda", "depth"]
LENGTHS = [1, 4, 2, 7, 3, 4]


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
    # inputs, linear, tanh (and the per-member sum) are a batch each; then one batch sums
    # the stacks of all six lengths; the stacks themselves never run
    per_member = 4 if fn is loss_sum else 3
    assert_matches_eager(fn, sequences(), make_linear(), strategy=strategy, atol=1e-6,
                         rtol=1e-5, max_batches=per_member + 1)
    stats = db.stats()
    assert stats.batches == per_member + 1, stats
    assert stats.signatures == per_member + 1, stats


def test_float64_sums_match_eager_closely():
    assert_matches_eager(loss_sum, sequences(torch.float64), make_linear(torch.float64),
                         atol=1e-12, rtol=1e-12)
    assert db.stats().batches == 5


def stack_returned_too(seq, lin):
    stacked = torch.stack([torch.tanh(lin(x)) for x in seq])
    return stacked.sum(0), stacked


def sum_over_dim1(seq, lin):
    return torch.stack([torch.tanh(lin(x)) for x in seq]).sum(1)


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


def half_sum(seq, lin):
    return torch.stack([torch.tanh(lin(x)).half() for x in seq]).sum()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fn, fused", [(stack_returned_too, True), (sum_over_dim1, False),
                                       (stack_read_first, False), (stack_without_grad, False),
                                       (half_sum, False)])
def test_what_the_rewrite_leaves_alone_stays_exact(fn, fused, strategy):
    # a stack also returned still runs; other dims, a stack already run, a stack made
    # without grad (its members must get no gradient) and float16 are recorded as written
    outs = assert_matches_eager(fn, sequences(), make_linear(), strategy=strategy,
                                atol=1e-3 if fn is half_sum else 1e-6, rtol=1e-3)
    names = {getattr(s, "name", "") for s in _signatures_of(fn)}
    assert ("stack(...).sum(0)" in names or "stack(...).sum()" in names) == fused, names
    assert outs


def _signatures_of(fn):
    """The signatures of the batches one run of ``fn`` executes."""
    from dynbatch import execute
    seen = []
    original = execute.run_batch

    def spy(nodes, info):
        seen.append(info)
        return original(nodes, info)
    execute.run_batch = spy
    try:
        db.batched(fn)(sequences(), make_linear())
    finally:
        execute.run_batch = original
    return seen


def test_in_a_scope_and_read_after():
    lin = make_linear()
    seqs = sequences()
    with db.autobatch():
        sums = [loss_sum(seq, lin) for seq in seqs]
    for got, seq in zip(sums, seqs):
        torch.testing.assert_close(got.value, loss_sum(seq, lin), atol=1e-6, rtol=1e-5)


def test_a_stack_summed_at_once_moves_after_its_sum():
    # torch.stack(xs).sum(): the stack reads only the sum afterwards, so the members keep one
    # user each; with another op in between, nothing moves. Either way the graph stays valid
    # and the values are eager's
    lin = make_linear()
    seq = sequences()[3]
    with db.autobatch() as run:
        members = [torch.tanh(lin(x)) for x in seq]
        total = torch.stack(members).sum()
        nodes = run.graph.nodes
        stack_fn = getattr(torch.stack, "__wrapped__", torch.stack)   # patched while recording
        assert nodes[-2] is total.node and nodes[-1].fn is stack_fn
        assert input_ids(nodes[-1]) == (total.node.id,)
        run.graph.lint()
        stacked = torch.stack(members)
        doubled = stacked * 2
        other = stacked.sum(0)
        assert nodes[-1] is other.node and nodes[-3] is stacked.node
        assert len(input_ids(nodes[-3])) == len(members)
        run.graph.lint()
    eager = [torch.tanh(lin(x)) for x in seq]
    torch.testing.assert_close(total.value, torch.stack(eager).sum(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(other.value, torch.stack(eager).sum(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(doubled.value, torch.stack(eager) * 2)
