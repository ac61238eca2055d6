"""Each reference model batched by dynbatch computes what it computes eagerly, per example.

Values and every parameter gradient are compared in float64 (conftest) with atol 1e-8, on
small random inputs and on a few real SST trees where the data is present. Every test also
checks that batching happened: far fewer batched calls than recorded nodes.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dynbatch as db
from dynbatch.data import sst
from dynbatch.models import BiLSTMTagger, BinaryTreeLSTM, ChildSumTreeLSTM
from dynbatch.testing import assert_matches_eager

VOCAB, DIM, CLASSES = 60, 16, 5
ATOL = 1e-8
SST_DIR = Path(os.environ.get(sst.DATA_ENV) or
               Path(__file__).resolve().parents[2] / "shared" / "data" / "sst")


@dataclass(eq=False)  # identity semantics, like the SST reader's nodes keyed by id
class Node:
    label: int
    word_id: int | None = None
    children: tuple["Node", ...] = ()


def random_binary_tree(rng: random.Random, n_leaves: int) -> Node:
    # Labels include -1 and sst.IGNORE: nodes that carry no loss.
    label = rng.choice([sst.IGNORE, -1, 0, 1, 2, 3, 4])
    if n_leaves == 1:
        return Node(label, rng.randrange(VOCAB))
    k = rng.randint(1, n_leaves - 1)
    return Node(label, None, (random_binary_tree(rng, k), random_binary_tree(rng, n_leaves - k)))


def random_nary_tree(rng: random.Random, depth: int) -> Node:
    n = rng.randint(0, 4) if depth > 0 else 0
    return Node(rng.randrange(CLASSES), rng.randrange(VOCAB),
                tuple(random_nary_tree(rng, depth - 1) for _ in range(n)))


class CellBlocks(BinaryTreeLSTM):
    leaf = db.block(BinaryTreeLSTM.leaf)
    node = db.block(BinaryTreeLSTM.node)


class AllBlocks(CellBlocks):
    node_loss = db.block(BinaryTreeLSTM.node_loss)


BINARY_MODELS = {"plain": BinaryTreeLSTM, "cell-blocks": CellBlocks, "all-blocks": AllBlocks}


def tree_loss(tree, model):
    return model(tree)


def root_logits(tree, model):
    return model.root_logits(tree)


def both(tree, model):
    return model.forward_with_logits(tree)


def tag_loss(example, model):
    return model(*example)


def tag_logits(example, model):
    return torch.stack(model.predict_logits(example[0]))


def assert_batched(nodes_per_batch: float) -> None:
    s = db.stats()
    assert s.fallbacks == 0, s
    assert s.batches * nodes_per_batch <= s.nodes, f"too little batching: {s}"


@pytest.fixture(scope="module")
def sst_trees(tmp_path_factory) -> tuple[list, int]:
    """A few real SST dev trees (short and long ones), word ids from their own vocabulary."""
    if not (SST_DIR / "dev.txt").exists():
        pytest.skip(f"SST data not found in {SST_DIR} (set {sst.DATA_ENV})")
    tmp = tmp_path_factory.mktemp("sst")
    with open(SST_DIR / "dev.txt", encoding="utf-8") as f:
        (tmp / "dev.txt").write_text("".join(next(f) for _ in range(40)), encoding="utf-8")
    by_size = sorted(sst.load_split(tmp, "dev", "fine"), key=lambda t: t.size())
    trees = by_size[:12:2] + by_size[-2:]
    vocab = sst.build_vocab(trees)
    return [sst.index_tree(t, vocab) for t in trees], len(vocab)


@pytest.mark.parametrize("kind", BINARY_MODELS)
def test_binary_treelstm_matches_eager_random(kind):
    torch.manual_seed(0)
    rng = random.Random(0)
    model = BINARY_MODELS[kind](VOCAB, DIM, DIM, CLASSES, dropout=0.5).eval()
    trees = [random_binary_tree(rng, rng.randint(1, 20)) for _ in range(12)]
    trees.append(Node(sst.IGNORE, 3))   # a one-leaf tree with no labelled node: loss 0
    assert_matches_eager(tree_loss, trees, model, atol=ATOL)
    assert_batched(8)
    assert_matches_eager(both, trees, model, atol=ATOL)
    with torch.no_grad():
        assert_matches_eager(root_logits, trees, model, atol=ATOL)
    assert_batched(8)


def test_binary_treelstm_blocks_cut_the_graph():
    torch.manual_seed(0)
    rng = random.Random(5)
    trees = [random_binary_tree(rng, rng.randint(2, 20)) for _ in range(10)]
    nodes = {}
    for kind, cls in BINARY_MODELS.items():
        db.batched(tree_loss)(trees, cls(VOCAB, DIM, DIM, CLASSES))
        nodes[kind] = db.stats().nodes
    assert nodes["all-blocks"] < nodes["cell-blocks"] < nodes["plain"], nodes


def test_binary_treelstm_depth_strategy():
    torch.manual_seed(1)
    rng = random.Random(1)
    model = AllBlocks(VOCAB, DIM, DIM, CLASSES)
    trees = [random_binary_tree(rng, rng.randint(1, 15)) for _ in range(8)]
    assert_matches_eager(tree_loss, trees, model, atol=ATOL, strategy="depth")
    assert_batched(4)


@pytest.mark.parametrize("kind", ["plain", "all-blocks"])
def test_binary_treelstm_matches_eager_on_sst(sst_trees, kind):
    trees, vocab_size = sst_trees
    torch.manual_seed(2)
    model = BINARY_MODELS[kind](vocab_size, DIM, DIM, CLASSES, dropout=0.5).eval()
    assert_matches_eager(tree_loss, trees, model, atol=ATOL)
    assert_batched(8)
    binary = sst.binary(trees)
    assert binary and any(n.label == sst.IGNORE for t in binary for n in t.postorder())
    model2 = BINARY_MODELS[kind](vocab_size, DIM, DIM, 2).eval()
    assert_matches_eager(tree_loss, binary, model2, atol=ATOL)


def test_binary_treelstm_dropout_trains_batched():
    # Dropout draws other random numbers batched than eagerly, so only check that it acts:
    # training-mode losses differ from eval-mode ones and gradients flow.
    torch.manual_seed(3)
    rng = random.Random(3)
    model = AllBlocks(VOCAB, DIM, DIM, CLASSES, dropout=0.5)
    trees = [random_binary_tree(rng, 10) for _ in range(6)]
    train_losses = torch.stack(db.batched(tree_loss)(trees, model.train()))
    train_losses.sum().backward()
    assert model.leaf_gates.weight.grad.abs().sum() > 0
    with torch.no_grad():
        eval_losses = torch.stack(db.batched(tree_loss)(trees, model.eval()))
    assert not torch.allclose(train_losses.detach(), eval_losses)


def test_childsum_treelstm_matches_eager_random():
    torch.manual_seed(4)
    rng = random.Random(4)
    model = ChildSumTreeLSTM(VOCAB, DIM, DIM, CLASSES)
    trees = [random_nary_tree(rng, rng.randint(0, 4)) for _ in range(12)]
    assert_matches_eager(tree_loss, trees, model, atol=ATOL)
    assert_batched(5)


def test_childsum_treelstm_matches_eager_on_sst(sst_trees):
    # SST trees as Child-Sum input: internal nodes read the unknown-word id 0.
    trees, vocab_size = sst_trees

    def as_childsum(node):
        return Node(node.label, node.word_id or 0, tuple(as_childsum(c) for c in node.children))

    torch.manual_seed(5)
    model = ChildSumTreeLSTM(vocab_size, DIM, DIM, CLASSES)
    assert_matches_eager(tree_loss, [as_childsum(t) for t in trees], model, atol=ATOL)
    assert_batched(5)


def test_tagger_matches_eager_random():
    torch.manual_seed(6)
    rng = random.Random(6)
    model = BiLSTMTagger(VOCAB, DIM, DIM, CLASSES)
    sentences = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(12)]
    examples = [(s, [rng.randrange(CLASSES) for _ in s]) for s in sentences]
    assert_matches_eager(tag_loss, examples, model, atol=ATOL)
    assert_batched(5)
    with torch.no_grad():
        assert_matches_eager(tag_logits, examples, model, atol=ATOL)


def test_tagger_matches_eager_on_sst(sst_trees):
    trees, vocab_size = sst_trees
    examples = []
    for t in trees:
        leaves = [n for n in t.postorder() if n.is_leaf]
        examples.append(([n.word_id for n in leaves], [n.label for n in leaves]))
    torch.manual_seed(7)
    model = BiLSTMTagger(vocab_size, DIM, DIM, CLASSES)
    assert_matches_eager(tag_loss, examples, model, atol=ATOL)
    assert_batched(4)
