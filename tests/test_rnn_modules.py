"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` called per example on an unbatched sequence
(L, d) batch natively (native.py): one call of the module for a minibatch of one length,
and one packed call for a minibatch of many lengths (NOTE [ragged groups] in
rules/ragged.py), not vmap (which has no rule for aten::lstm) and not one call per example
or per length.

Against the eager per-example loop in float64: outputs, final states and every parameter
gradient, for one to three layers, one and two directions, ``batch_first`` (which
unbatched input ignores), no initial state, a per-example one and a shared one, lengths
1..40 mixed in one minibatch.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynbatch as db
from dynbatch.testing import assert_matches_eager

ATOL, RTOL = 1e-10, 1e-8
FORMS = [(1, False, False), (2, True, False), (2, True, True), (3, False, True)]


def make(cls, layers, bidirectional, batch_first):
    torch.manual_seed(1)
    return cls(4, 5, num_layers=layers, bidirectional=bidirectional,
               batch_first=batch_first).double()


def directions_x_layers(m) -> int:
    return m.num_layers * (2 if m.bidirectional else 1)


def run(x, m):
    out, state = m(x)
    return out, state


def run_with_state(example, m):
    x, h = example
    out, state = m(x, (h, 2 * h) if isinstance(m, nn.LSTM) else h)
    return out.sum(0), state


def run_with_shared_state(x, m, h0):
    return m(x, (h0, h0.flip(0)) if isinstance(m, nn.LSTM) else h0)


def sequences(lengths):
    torch.manual_seed(2)
    return [torch.randn(n, 4, dtype=torch.float64) for n in lengths]


def mixed_lengths(n: int = 40) -> list[int]:
    """n lengths 1..40 in a shuffled order, 1 and 40 included, some repeated."""
    g = torch.Generator().manual_seed(3)
    lengths = [1, 40] + torch.randint(1, 41, (n - 2,), generator=g).tolist()
    return [lengths[i] for i in torch.randperm(n, generator=g).tolist()]


def assert_native(expected_batches: int):
    s = db.stats()
    assert s.vmap_batches == 0 and s.fallbacks == 0, s
    assert s.batches == expected_batches, s.table()
    assert {r.how for r in s.rows() if r.kind == "block"} <= {"block", "ragged"}, s.table()


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layers, bidirectional, batch_first", FORMS)
def test_one_length_is_one_call(cls, layers, bidirectional, batch_first):
    m = make(cls, layers, bidirectional, batch_first)
    assert_matches_eager(run, sequences([6] * 5), m, atol=ATOL, rtol=RTOL)
    assert_native(1)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layers, bidirectional, batch_first", FORMS[:2])
@pytest.mark.parametrize("mixed", [False, True], ids=["one length", "lengths 1..40"])
def test_initial_states_per_example_and_shared(cls, layers, bidirectional, batch_first,
                                               mixed):
    m = make(cls, layers, bidirectional, batch_first)
    d = directions_x_layers(m)
    xs = sequences(mixed_lengths(24) if mixed else [6] * 4)
    hs = [torch.randn(d, 5, dtype=torch.float64) for _ in xs]
    assert_matches_eager(run_with_state, list(zip(xs, hs)), m, atol=ATOL, rtol=RTOL)
    # the module and the sum over the output's steps (and 2 * h for an LSTM's c), one
    # call each over all the lengths
    assert_native(3 if cls is nn.LSTM else 2)
    h0 = torch.randn(d, 5, dtype=torch.float64, requires_grad=True)
    assert_matches_eager(run_with_shared_state, xs, m, h0, atol=ATOL, rtol=RTOL,
                         params=list(m.parameters()) + [h0])
    assert_native(1)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layers, bidirectional, batch_first", FORMS)
def test_mixed_lengths_are_one_call(cls, layers, bidirectional, batch_first):
    # lengths 1..40 in one minibatch (1 and 40 included): one packed call for them all
    m = make(cls, layers, bidirectional, batch_first)
    lengths = mixed_lengths()
    assert len(set(lengths)) > 15
    assert_matches_eager(run, sequences(lengths), m, atol=ATOL, rtol=RTOL)
    assert_native(1)
    assert db.stats().rows()[0].how == "ragged"


def test_mixed_lengths_in_training_mode_with_dropout_off():
    # a module in training mode (dropout 0 between layers) packs as in eval mode
    m = make(nn.LSTM, 2, True, False)
    m.train()
    assert_matches_eager(run, sequences(mixed_lengths(12)), m, atol=ATOL, rtol=RTOL)
    assert_native(1)


def test_batched_input_is_left_to_the_fallback():
    # an input that is already a batch of one, (L, 1, d): not the unbatched form, so the
    # module runs one example at a time, as before; values stay exact
    m = make(nn.GRU, 1, False, False)
    xs = [x.unsqueeze(1) for x in sequences([4] * 3)]
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        assert_matches_eager(run, xs, m, atol=ATOL, rtol=RTOL)
    assert db.stats().fallbacks == 3


def test_mixed_lengths_with_dropout_between_layers():
    # dropout between layers in training draws other numbers than the eager loop (as any
    # random op batched): one packed call still, each example's outputs of its own length;
    # in eval mode the same module equals eager
    torch.manual_seed(1)
    m = nn.GRU(4, 5, num_layers=2, dropout=0.5).double().train()
    lengths = mixed_lengths(12)
    outs = db.batched(run)(sequences(lengths), m)
    assert_native(1)
    assert [o.shape[0] for o, _ in outs] == lengths
    torch.stack([o.sum() for o, _ in outs]).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    assert_matches_eager(run, sequences(lengths), m, atol=ATOL, rtol=RTOL)
    assert_native(1)
