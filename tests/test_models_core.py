"""The proof that dynbatch works on the models it is for: the eager-equivalence oracle
(every output and every parameter gradient, float64, max abs diff < 1e-8) on Tree-LSTMs over
random trees and on LSTM/GRU loops over sequences of lengths 1..30, under both strategies,
with and without the cells marked as blocks; and batching actually happened.

The models are written here, per example, in plain eager PyTorch (they do not come from
dynbatch.models, so these tests check the engine alone).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch.lazy import current
from dynbatch.testing import assert_matches_eager

ATOL, RTOL = 1e-8, 0.0          # max abs diff < 1e-8, nothing relative
VOCAB, EMBED, HIDDEN, CLASSES = 20, 8, 8, 3
STRATEGIES = ["agenda", "depth"]


@dataclass(eq=False)
class Tree:
    label: int
    word: int | None = None
    children: tuple = ()


def height(t: Tree) -> int:
    return 0 if not t.children else 1 + max(height(c) for c in t.children)


def count(t: Tree) -> int:
    return 1 + sum(count(c) for c in t.children)


def random_binary_tree(rng: random.Random, leaves: int) -> Tree:
    label = rng.randrange(CLASSES)
    if leaves == 1:
        return Tree(label, rng.randrange(VOCAB))
    k = rng.randint(1, leaves - 1)
    return Tree(label, None, (random_binary_tree(rng, k), random_binary_tree(rng, leaves - k)))


def random_nary_tree(rng: random.Random, depth: int) -> Tree:
    n = rng.choice([0, 1, 2, 3, 4]) if depth > 0 else 0
    return Tree(rng.randrange(CLASSES), rng.randrange(VOCAB),
                tuple(random_nary_tree(rng, depth - 1) for _ in range(n)))


def linted(fn, n_examples):
    """fn, plus Graph.lint() of the run's graph while the last example is traced (a run's
    graph is dropped when it ends, so this is the one place to check the real thing)."""
    seen = [0]

    def wrapper(example, *args):
        out = fn(example, *args)
        run = current.tracer
        if run is not None:
            seen[0] += 1
            if seen[0] == n_examples:
                run.graph.lint()
        return out
    wrapper.linted = seen
    return wrapper


# -- binary Tree-LSTM ----------------------------------------------------------------------

class LeafCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(EMBED, 3 * HIDDEN)

    def forward(self, x):
        i, o, u = self.lin(x).chunk(3)
        c = torch.sigmoid(i) * torch.tanh(u)
        return torch.sigmoid(o) * torch.tanh(c), c


class BinaryCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2 * HIDDEN, 5 * HIDDEN)

    def forward(self, hl, cl, hr, cr):
        i, fl, fr, o, u = self.lin(torch.cat([hl, hr])).chunk(5)
        c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(fl) * cl + torch.sigmoid(fr) * cr
        return torch.sigmoid(o) * torch.tanh(c), c


class BinaryTreeLSTM(nn.Module):
    def __init__(self, blocks: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMBED)
        self.leaf = LeafCell()
        self.cell = BinaryCell()
        self.out = nn.Linear(HIDDEN, CLASSES)
        if blocks:
            db.block(self.leaf)
            db.block(self.cell)

    def encode(self, t: Tree):
        """(h, c, sum of the per-node losses of the subtree)."""
        if not t.children:
            h, c = self.leaf(self.emb(torch.tensor(t.word)))
            return h, c, self.node_loss(h, t.label)
        hl, cl, ll = self.encode(t.children[0])
        hr, cr, lr = self.encode(t.children[1])
        h, c = self.cell(hl, cl, hr, cr)
        return h, c, self.node_loss(h, t.label) + ll + lr

    def node_loss(self, h, label):
        return F.cross_entropy(self.out(h), torch.tensor(label))


def binary_tree_loss(tree, model):
    return model.encode(tree)[2]


def nodes_of(fn, examples, *args) -> int:
    db.batched(fn)(examples, *args)
    return db.stats().nodes


def ops_per_internal_node(model) -> int:
    """Recorded nodes for ONE internal tree node, measured: a two-leaf tree minus its two
    leaves alone. By hand, without blocks: the cell (cat, linear, chunk, 3 x (sigmoid, mul)
    for i/fl/fr, tanh(u), 2 adds, sigmoid(o), tanh(c), mul = 15), the node's loss (linear,
    cross_entropy = 2; tensor(label) is an immediate, not a node) and 2 adds of the subtree
    losses: 19. With the cell a block, its 15 become 1: 5."""
    a, b = Tree(0, 1), Tree(1, 2)
    both = nodes_of(binary_tree_loss, [Tree(2, None, (a, b))], model)
    alone = nodes_of(binary_tree_loss, [a], model) + nodes_of(binary_tree_loss, [b], model)
    return both - alone


@pytest.mark.parametrize("blocks", [False, True], ids=["ops", "blocks"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_binary_tree_lstm(strategy, blocks, strict):
    torch.manual_seed(0)
    rng = random.Random(0)
    model = BinaryTreeLSTM(blocks)
    trees = [random_binary_tree(rng, rng.randint(1, 14)) for _ in range(64)]
    max_height = max(height(t) for t in trees)
    ops = ops_per_internal_node(model)
    assert ops == (5 if blocks else 19)

    fn = linted(binary_tree_loss, len(trees))
    assert_matches_eager(fn, trees, model, atol=ATOL, rtol=RTOL, strategy=strategy,
                         max_batches=(max_height + 2) * ops)
    assert fn.linted[0] == len(trees)
    s = db.stats()
    assert s.fallbacks == 0 and s.examples == 64
    assert s.nodes / s.batches >= 20, s
    assert s.nodes >= sum(count(t) for t in trees) * (4 if blocks else 14)


# -- Child-Sum Tree-LSTM -------------------------------------------------------------------

class ChildSumCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.W_iou = nn.Linear(EMBED, 3 * HIDDEN)
        self.U_iou = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.W_f = nn.Linear(EMBED, HIDDEN)
        self.U_f = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x, hs, cs):
        h_sum = torch.stack(hs).sum(0) if hs else torch.zeros(HIDDEN)
        i, o, u = (self.W_iou(x) + self.U_iou(h_sum)).chunk(3)
        c = torch.sigmoid(i) * torch.tanh(u)
        wx = self.W_f(x)
        for h_k, c_k in zip(hs, cs):
            c = c + torch.sigmoid(wx + self.U_f(h_k)) * c_k
        return torch.sigmoid(o) * torch.tanh(c), c


class ChildSumTreeLSTM(nn.Module):
    def __init__(self, blocks: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMBED)
        self.cell = ChildSumCell()
        self.out = nn.Linear(HIDDEN, CLASSES)
        if blocks:      # one node per tree node; lists of children's states as arguments
            db.block(self.cell)

    def encode(self, t: Tree):
        kids = [self.encode(k) for k in t.children]
        h, c = self.cell(self.emb(torch.tensor(t.word)), [k[0] for k in kids],
                         [k[1] for k in kids])
        loss = F.cross_entropy(self.out(h), torch.tensor(t.label))
        for k in kids:
            loss = loss + k[2]
        return h, c, loss


def childsum_loss(tree, model):
    h, _, loss = model.encode(tree)
    return loss, F.log_softmax(model.out(h), dim=-1)


@pytest.mark.parametrize("blocks", [False, True], ids=["ops", "blocks"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_child_sum_tree_lstm(strategy, blocks, strict):
    torch.manual_seed(1)
    rng = random.Random(1)
    model = ChildSumTreeLSTM(blocks)
    trees = [random_nary_tree(rng, rng.randint(0, 4)) for _ in range(24)]
    fn = linted(childsum_loss, len(trees))
    assert_matches_eager(fn, trees, model, atol=ATOL, rtol=RTOL, strategy=strategy)
    s = db.stats()
    assert s.fallbacks == 0
    # A node records ~15 ops plus ~6 per child, the per-child ones chained (c = c + ...), and
    # stack/sum signatures differ per number of children: measured 241 (agenda) and 362
    # (depth) batches for 8780 nodes. Per-node execution would be 8780.
    if blocks:
        # per tree node: embedding, the cell, linear, cross_entropy, one add per child
        # (tensor(word) and tensor(label) are immediates, not nodes); the cell's signature
        # depends on the number of children (0-4), so each level needs a few batches; plus
        # the root's linear and log_softmax returned by childsum_loss
        assert s.nodes == sum(4 * count(t) + count(t) - 1 + 2 for t in trees)
        assert s.nodes / s.batches >= 5, s
    else:
        assert s.nodes / s.batches >= 15, s


# -- LSTM / GRU over sequences ---------------------------------------------------------------

class HandLSTMCell(nn.Module):
    """A user-written LSTM cell: recorded op by op unless marked as a block."""

    def __init__(self):
        super().__init__()
        self.ih = nn.Linear(EMBED, 4 * HIDDEN)
        self.hh = nn.Linear(HIDDEN, 4 * HIDDEN)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class SeqModel(nn.Module):
    def __init__(self, kind: str, blocks: bool = False):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCAB, EMBED)
        self.cell = {"lstm": lambda: nn.LSTMCell(EMBED, HIDDEN),
                     "gru": lambda: nn.GRUCell(EMBED, HIDDEN),
                     "hand": HandLSTMCell}[kind]()
        self.out = nn.Linear(HIDDEN, VOCAB)
        if blocks:
            db.block(self.cell)

    def forward_one(self, words):
        """Language-model loss of one sentence, one step at a time."""
        h = torch.zeros(HIDDEN)
        c = torch.zeros(HIDDEN)
        loss = torch.zeros(())
        for w, nxt in zip(words, words[1:] + [0]):
            x = self.emb(torch.tensor(w))
            if self.kind == "gru":
                h = self.cell(x, h)
            else:
                h, c = self.cell(x, (h, c))
            loss = loss + F.cross_entropy(self.out(h), torch.tensor(nxt))
        return loss, h


def seq_loss(words, model):
    return model.forward_one(words)


@pytest.mark.parametrize("kind, blocks", [("lstm", False), ("gru", False), ("hand", False),
                                          ("hand", True)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recurrent_cells_over_lengths_1_to_30(kind, blocks, strategy, strict):
    torch.manual_seed(2)
    rng = random.Random(2)
    model = SeqModel(kind, blocks)
    sentences = [[rng.randrange(VOCAB) for _ in range(n)] for n in range(1, 31)]
    rng.shuffle(sentences)
    per_step = nodes_of(seq_loss, [[1, 2]], model) - nodes_of(seq_loss, [[1]], model)
    # per step: embedding, the cell (1 node as a block, 13 by hand), linear,
    # cross_entropy, add (tensor(w) and tensor(next) are immediates, not nodes)
    assert per_step == (17 if kind == "hand" and not blocks else 5)
    fn = linted(seq_loss, len(sentences))
    # one batch per op per time step at most (the agenda merges steps of different sentences
    # only where they line up); the initial zeros are constants, gathered as values
    assert_matches_eager(fn, sentences, model, atol=ATOL, rtol=RTOL, strategy=strategy,
                         max_batches=30 * per_step)
    s = db.stats()
    assert s.fallbacks == 0
    assert s.nodes == per_step * sum(range(1, 31))
    assert s.nodes / s.batches >= 10, s


def test_sequence_cell_block_records_one_node_per_step(strict):
    torch.manual_seed(3)
    plain, marked = SeqModel("hand"), SeqModel("hand", blocks=True)
    marked.load_state_dict(plain.state_dict())
    words = [[1, 2, 3, 4], [5, 6]]
    assert nodes_of(seq_loss, words, plain) - nodes_of(seq_loss, words, marked) == 6 * 12
