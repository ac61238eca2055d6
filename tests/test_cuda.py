"""The same oracle on a GPU: values and gradients equal the eager per-example code when
every tensor lives on CUDA (skipped where no GPU is present)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch.models.tree_lstm import BinaryTreeLSTM, ChildSumTreeLSTM
from dynbatch.testing import assert_matches_eager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


class Tree:
    def __init__(self, label, word_id=None, children=()):
        self.label, self.word_id, self.children = label, word_id, children


def binary_tree(rng, leaves):
    if leaves == 1:
        return Tree(rng.randrange(5), rng.randrange(30))
    k = rng.randint(1, leaves - 1)
    return Tree(rng.randrange(5), None, (binary_tree(rng, k), binary_tree(rng, leaves - k)))


def nary_tree(rng, depth):
    n = rng.choice([0, 1, 2, 3]) if depth > 0 else 0
    return Tree(rng.randrange(5), rng.randrange(30), tuple(nary_tree(rng, depth - 1)
                                                            for _ in range(n)))


@pytest.fixture
def cuda_default():
    torch.set_default_dtype(torch.float64)
    with torch.device("cuda"):
        yield
    torch.set_default_dtype(torch.float32)


class Blocked(BinaryTreeLSTM):
    leaf = db.block(BinaryTreeLSTM.leaf)
    node = db.block(BinaryTreeLSTM.node)
    node_loss = db.block(BinaryTreeLSTM.node_loss)


@pytest.mark.parametrize("cls", [BinaryTreeLSTM, Blocked])
@pytest.mark.parametrize("strategy", ["agenda", "depth"])
def test_binary_tree_lstm_on_cuda(cuda_default, cls, strategy):
    rng = random.Random(0)
    trees = [binary_tree(rng, rng.randint(1, 12)) for _ in range(24)]
    model = cls(30, 16, 16, 5)
    assert next(model.parameters()).is_cuda
    out = assert_matches_eager(lambda t, m: m(t), trees, model, strategy=strategy,
                               atol=1e-8, rtol=1e-6)
    assert all(o.is_cuda for o in out)
    stats = db.stats()
    assert stats.batches * 5 < stats.nodes, stats


def test_child_sum_and_reads_on_cuda(cuda_default):
    rng = random.Random(1)
    trees = [nary_tree(rng, 3) for _ in range(16)]
    model = ChildSumTreeLSTM(30, 16, 16, 5)
    assert_matches_eager(lambda t, m: m(t), trees, model, atol=1e-8, rtol=1e-6)

    def decide(t, m):        # a read mid-run, on the GPU
        logits = m.logits(t)
        k = int(logits.argmax())
        return F.log_softmax(logits, dim=-1)[k]
    assert_matches_eager(decide, trees, model, atol=1e-8, rtol=1e-6)
    if db.api.greenlet is not None:   # without it reads stay exact but run serially
        assert db.stats().rounds >= 1


def test_gru_cells_and_scope_on_cuda(cuda_default):
    cell = nn.GRUCell(8, 8)
    seqs = [torch.randn(n, 8) for n in (1, 3, 7, 2)]

    def run(seq, cell):
        h = torch.zeros(8)
        for x in seq:
            h = cell(x, h)
        return h
    assert_matches_eager(run, seqs, cell, atol=1e-8, rtol=1e-6)
    with db.autobatch():
        ys = [torch.tanh(s).sum() for s in seqs]
    assert all(y.value.is_cuda for y in ys)
