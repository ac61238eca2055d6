"""Calls over sequences of different lengths run as one call (rules/ragged.py, NOTE
[ragged groups]; rules/segments.py): row-wise ops over concatenated rows, reductions over the sequence as
segment sums, softmax over it padded with -inf, dot-product attention.

Every case against the eager per-example loop in float64 (values and every gradient),
with lengths 1..40 mixed in one minibatch (1 and 40 included), and with the number of
batched calls bounded by the number of ops, whatever the number of distinct lengths.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch.rules import segments
from dynbatch.testing import assert_matches_eager

ATOL, RTOL = 1e-10, 1e-8
D = 6


def lengths_of(n: int = 24, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out = [1, 40] + torch.randint(1, 41, (n - 2,), generator=g).tolist()
    return [out[i] for i in torch.randperm(n, generator=g).tolist()]


def sentences(lengths, d: int = D):
    torch.manual_seed(5)
    return [torch.randn(n, d, dtype=torch.float64) for n in lengths]


@pytest.fixture
def model():
    torch.manual_seed(7)
    m = nn.ModuleDict({"lin": nn.Linear(D, D), "norm": nn.LayerNorm(D), "emb":
                       nn.Embedding(30, D), "out": nn.Linear(D, 5)}).double()
    return m


def assert_ragged(max_batches: int):
    s = db.stats()
    assert s.fallbacks == 0 and s.vmap_batches == 0, s.table()
    assert s.batches <= max_batches, s.table()
    assert any(r.how == "ragged" for r in s.rows()), s.table()


# -- row-wise ---------------------------------------------------------------------------------

def elementwise(x, m):
    return torch.tanh(x) * x + 1.5


def modules(x, m):
    return m["norm"](torch.relu(m["lin"](x)))


def functional(x, m):
    h = F.linear(x, m["lin"].weight, m["lin"].bias)
    return F.layer_norm(h, (D,)).sigmoid()


def softmaxes(x, m):
    return F.log_softmax(x, dim=-1) + torch.softmax(x, 1)


def shared_matmul(x, m):
    return x @ m["lin"].weight + torch.matmul(x, m["lin"].bias)[:, None]


@pytest.mark.parametrize("fn, ops", [(elementwise, 3), (modules, 3), (functional, 3),
                                     (softmaxes, 3), (shared_matmul, 5)])
def test_row_wise_ops_are_one_call_each(fn, ops, model):
    assert_matches_eager(fn, sentences(lengths_of()), model, atol=ATOL, rtol=RTOL)
    assert_ragged(ops)


def spread(example, m):
    # a per-example vector and a per-example scalar broadcast over every row
    x, v, s = example
    return (x * v - s).exp()


def test_per_example_operands_spread_over_rows(model):
    xs = sentences(lengths_of())
    torch.manual_seed(1)
    examples = [(x, torch.randn(D, dtype=torch.float64, requires_grad=True),
                 torch.randn((), dtype=torch.float64, requires_grad=True)) for x in xs]
    assert_matches_eager(spread, examples, model, atol=ATOL, rtol=RTOL,
                         params=[p for e in examples for p in e[1:]])
    assert_ragged(3)


def tagged(example, m):
    words, tags = example
    logits = m["out"](torch.tanh(m["emb"](torch.tensor(words))))
    return F.cross_entropy(logits, torch.tensor(tags), reduction="sum")


def token_tags(lengths, ignored: bool = False):
    g = torch.Generator().manual_seed(9)
    out = []
    for n in lengths:
        tags = torch.randint(0, 5, (n,), generator=g).tolist()
        if ignored and n > 2:
            tags[1] = -100
        out.append((torch.randint(0, 30, (n,), generator=g).tolist(), tags))
    return out


def test_tagger_of_embedding_linear_and_loss(model):
    assert_matches_eager(tagged, token_tags(lengths_of()), model, atol=ATOL, rtol=RTOL)
    assert_ragged(4)


def projections(example, m):
    x, v = example
    return (torch.einsum("ld,kd->lk", x, m["lin"].weight), torch.einsum("ld,d->l", x, v),
            torch.einsum("ld,ld->l", [x, x]), torch.einsum("lc,cd,d->lc", x, m["lin"].weight, v))


def test_einsum_with_the_sequence_as_a_free_index(model):
    xs = sentences(lengths_of())
    torch.manual_seed(2)
    examples = [(x, torch.randn(D, dtype=torch.float64, requires_grad=True)) for x in xs]
    assert_matches_eager(projections, examples, model, atol=ATOL, rtol=RTOL,
                         params=list(model.parameters()) + [v for _, v in examples])
    assert_ragged(4)


# -- reductions over the sequence -----------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_over_tokens(reduction, weighted, model):
    weight = torch.rand(5, dtype=torch.float64) + 0.5 if weighted else None

    def loss(example, m):
        words, tags = example
        logits = m["out"](m["emb"](torch.tensor(words)))
        return F.cross_entropy(logits, torch.tensor(tags), weight=weight, reduction=reduction)
    assert_matches_eager(loss, token_tags(lengths_of(), ignored=True), model, atol=ATOL,
                         rtol=RTOL)
    assert_ragged(3)


def test_nll_loss_over_tokens(model):
    def loss(example, m):
        words, tags = example
        return F.nll_loss(F.log_softmax(m["out"](m["emb"](torch.tensor(words))), -1),
                          torch.tensor(tags))
    assert_matches_eager(loss, token_tags(lengths_of()), model, atol=ATOL, rtol=RTOL)
    assert_ragged(4)


def pooled(x, m):
    h = m["lin"](x)
    return h.sum(0), h.mean(dim=0), h[:, 0].sum(), torch.sum(h, dim=[0])


def test_sums_and_means_over_the_sequence(model):
    assert_matches_eager(pooled, sentences(lengths_of()), model, atol=ATOL, rtol=RTOL)
    # Linear, mean, sum(0), sum(dim=[0]), the select, the sum of (L,): one call each
    assert_ragged(6)


def maxima(x, m):
    h = m["lin"](x)
    values, indices = h.max(0)
    return values, indices, h.amax(dim=0), torch.logsumexp(h, 0), h.min(dim=0).values


def test_max_min_and_logsumexp_over_the_sequence(model):
    assert_matches_eager(maxima, sentences(lengths_of()), model, atol=ATOL, rtol=RTOL)
    # Linear, max, amax, logsumexp, min
    assert_ragged(5)


# -- attention over the sequence ---------------------------------------------------------------

def attend(example, m):
    keys, query = example
    scores = keys @ query                       # (L,): each row with the example's query
    weights = torch.softmax(scores, dim=0)      # over the sequence
    context = weights @ keys                    # (d,): weighted sum over the sequence
    return context, F.log_softmax(scores, 0), torch.dot(weights, scores)


def test_dot_product_attention(model):
    keys = sentences(lengths_of())
    torch.manual_seed(4)
    queries = [torch.randn(D, dtype=torch.float64, requires_grad=True) for _ in keys]
    for k in keys:
        k.requires_grad_(True)
    assert_matches_eager(attend, list(zip(keys, queries)), model, atol=ATOL, rtol=RTOL,
                         params=keys + queries)
    assert_ragged(5)


# -- bounds, limits, failures ----------------------------------------------------------------

def test_batches_do_not_grow_with_distinct_lengths(model):
    counts = []
    for lengths in ([3, 3, 4, 4, 3, 4] * 4, lengths_of(24)):
        db.batched(tagged)(token_tags(lengths), model)
        counts.append(db.stats().batches)
    assert len(set(lengths_of(24))) > 12
    assert counts[0] == counts[1] == 4, counts


def not_row_wise(x, m):
    return x.flip(0).cumsum(0)


def test_ops_across_the_sequence_keep_one_batch_per_length(model):
    lengths = [2, 5, 5, 7, 2]
    assert_matches_eager(not_row_wise, sentences(lengths), model, atol=ATOL, rtol=RTOL)
    s = db.stats()
    assert s.batches == 2 * len(set(lengths)) and s.fallbacks == 0, s.table()
    assert not any(r.how == "ragged" for r in s.rows())


def test_a_failing_joint_call_runs_length_by_length(model, monkeypatch):
    def broken(self, tensors):
        raise RuntimeError("broken on purpose")
    monkeypatch.setattr(segments.Lengths, "cat", broken)
    monkeypatch.setattr("dynbatch.execute._warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches_eager(elementwise, sentences([2, 3, 3, 5]), model, atol=ATOL,
                             rtol=RTOL)
    assert any("Please report it" in str(w.message) and "test_ragged.py" in w.filename
               for w in caught), [str(w.message) for w in caught]
    assert db.stats().fallbacks == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_plans_made_ahead_run_jointly(workers, model):
    examples = token_tags(lengths_of(16))
    fn = db.batched(tagged)
    expected = fn(examples, model)
    loader = db.DataLoader(examples, fn, model, batch_size=16, num_workers=workers)
    for batch in loader:
        got = fn(batch, model)
    assert db.stats().batches == 4, db.stats().table()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


def test_embedding_scaled_by_frequency_runs_example_by_example(monkeypatch):
    # its gradient scales by the index counts of each call's own input: batched (densely
    # or across lengths, or through vmap) the counts would be the batch's
    monkeypatch.setattr("dynbatch.signature._ALONE", set())     # said once per process
    torch.manual_seed(3)
    table = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    module = nn.Embedding(10, 3, scale_grad_by_freq=True).double()
    ids = [[1, 2, 2], [2, 3, 1, 1], [1, 1, 1], [4]]

    def functional(words, m):
        return F.embedding(torch.tensor(words), table, scale_grad_by_freq=True).sum(0)

    def through_module(words, m):
        return m(torch.tensor(words)).sum(0)
    for fn, params in ((functional, [table]), (through_module, list(module.parameters()))):
        with pytest.warns(RuntimeWarning, match="one example at a time: .*scale_grad_by_freq"):
            assert_matches_eager(fn, ids, module, atol=ATOL, rtol=RTOL, params=params)
        assert db.stats().fallbacks == len(ids)
