"""The hand-batched baselines compute exactly what the eager per-example models compute."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from benchmarks.handbatched import (
    handbatched_binary_treelstm_loss,
    handbatched_binary_treelstm_root_logits,
    handbatched_childsum_loss,
    handbatched_childsum_root_logits,
    padded_tagger_loss,
)
from dynbatch.models import BiLSTMTagger, BinaryTreeLSTM, ChildSumTreeLSTM

VOCAB, EMBED, HIDDEN, CLASSES = 50, 7, 6, 5
TOL = 1e-8


@dataclass(eq=False)  # identity semantics: nodes are looked up by id, never compared
class Node:
    label: int
    word_id: int | None = None
    children: tuple["Node", ...] = ()


def random_binary_tree(rng: random.Random, n_leaves: int) -> Node:
    # Some labels are -1 so the "no loss on this node" path is exercised.
    label = rng.choice([-1, 0, 1, 2, 3, 4])
    if n_leaves == 1:
        return Node(label, rng.randrange(VOCAB))
    k = rng.randint(1, n_leaves - 1)
    return Node(label, None, (random_binary_tree(rng, k), random_binary_tree(rng, n_leaves - k)))


def random_nary_tree(rng: random.Random, depth: int) -> Node:
    # Every node carries a token and a label (the Child-Sum model reads both at the root).
    n = rng.randint(0, 5) if depth > 0 else 0
    return Node(rng.randrange(CLASSES), rng.randrange(VOCAB),
                tuple(random_nary_tree(rng, depth - 1) for _ in range(n)))


@pytest.fixture(autouse=True)
def float64():
    # The models create their zero states with torch.zeros, which follows the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def assert_same(model: torch.nn.Module, eager: list[torch.Tensor], batched: torch.Tensor) -> None:
    eager_t = torch.stack(eager)
    assert batched.shape == eager_t.shape
    assert (batched - eager_t).abs().max().item() < TOL
    g_eager = grads(model, eager_t.sum())
    g_batched = grads(model, batched.sum())
    for name, g in g_eager.items():
        assert (g - g_batched[name]).abs().max().item() < TOL, name


def test_binary_treelstm_matches_eager():
    torch.manual_seed(0)
    rng = random.Random(0)
    model = BinaryTreeLSTM(VOCAB, EMBED, HIDDEN, CLASSES, dropout=0.3).eval()
    trees = [random_binary_tree(rng, rng.randint(1, 25)) for _ in range(20)]
    assert_same(model, [model(t) for t in trees], handbatched_binary_treelstm_loss(model, trees))
    with torch.no_grad():
        eager = torch.stack([model.root_logits(t) for t in trees])
        assert (eager - handbatched_binary_treelstm_root_logits(model, trees)).abs().max() < TOL


def test_childsum_treelstm_matches_eager():
    torch.manual_seed(1)
    rng = random.Random(1)
    model = ChildSumTreeLSTM(VOCAB, EMBED, HIDDEN, CLASSES)
    trees = [random_nary_tree(rng, rng.randint(0, 4)) for _ in range(20)]
    assert_same(model, [model(t) for t in trees], handbatched_childsum_loss(model, trees))
    with torch.no_grad():
        eager = torch.stack([model.logits(t) for t in trees])
        assert (eager - handbatched_childsum_root_logits(model, trees)).abs().max() < TOL


def test_tagger_matches_eager():
    torch.manual_seed(2)
    rng = random.Random(2)
    model = BiLSTMTagger(VOCAB, EMBED, HIDDEN, CLASSES)
    sentences = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 15))] for _ in range(20)]
    tags = [[rng.randrange(CLASSES) for _ in s] for s in sentences]
    eager = [model(s, t) for s, t in zip(sentences, tags)]
    assert_same(model, eager, padded_tagger_loss(model, sentences, tags))


def test_tagger_logits_match_eager():
    from benchmarks.handbatched import padded_tagger_logits
    torch.manual_seed(3)
    rng = random.Random(3)
    model = BiLSTMTagger(VOCAB, EMBED, HIDDEN, CLASSES)
    sentences = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 15))] for _ in range(20)]
    with torch.no_grad():
        eager = torch.stack([l for s in sentences for l in model.predict_logits(s)])
        batched = padded_tagger_logits(model, sentences)
    assert batched.shape == eager.shape
    assert (batched - eager).abs().max().item() < TOL
