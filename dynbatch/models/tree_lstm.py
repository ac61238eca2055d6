"""Tree-LSTMs of Tai et al. (2015), written for ONE tree in plain eager PyTorch.

Trees follow a small protocol rather than a concrete class: a node has ``label: int``
(-1 means "no loss here"), ``word_id: int | None`` and ``children: tuple`` (empty for leaves).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = tuple[Tensor, Tensor]  # (h, c)


class BinaryTreeLSTM(nn.Module):
    """Constituency (N-ary, N=2) Tree-LSTM, eq. (9)-(14); words only at the leaves (SST)."""

    def __init__(
        self, vocab_size: int, embed_dim: int, hidden_dim: int, num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        # One Linear per node kind so a node costs a single matmul; gate order is part of
        # the contract with benchmarks/handbatched.py: leaf [i, o, u], node [i, fl, fr, o, u].
        self.leaf_gates = nn.Linear(embed_dim, 3 * hidden_dim)
        self.node_gates = nn.Linear(2 * hidden_dim, 5 * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def leaf(self, word: Tensor) -> State:
        # The word id arrives as a 0-d tensor, not an int: a Python int would be part of a
        # block's signature, so each word would get its own batch once `leaf` is a block.
        x = self.embedding(word)
        i, o, u = self.leaf_gates(x).chunk(3)
        # A leaf has no children, so there is no forget term.
        c = torch.sigmoid(i) * torch.tanh(u)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def node(self, left: State, right: State) -> State:
        (hl, cl), (hr, cr) = left, right
        i, fl, fr, o, u = self.node_gates(torch.cat([hl, hr], dim=0)).chunk(5)
        c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(fl) * cl + torch.sigmoid(fr) * cr
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def logits(self, h: Tensor) -> Tensor:
        return self.classifier(self.dropout(h))

    def node_loss(self, h: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(h), label)

    def _encode(self, tree: Any, visited: list[tuple[Tensor, int]] | None) -> State:
        if tree.children:
            left, right = tree.children
            state = self.node(self._encode(left, visited), self._encode(right, visited))
        else:
            state = self.leaf(torch.tensor(tree.word_id))
        if visited is not None:
            visited.append((state[0], tree.label))
        return state

    def encode(self, tree: Any) -> State:
        return self._encode(tree, None)

    def forward_with_logits(self, tree: Any) -> tuple[Tensor, Tensor]:
        visited: list[tuple[Tensor, int]] = []
        h_root, _ = self._encode(tree, visited)
        losses = [self.node_loss(h, torch.tensor(label)) for h, label in visited if label >= 0]
        # One stack and one sum, not a chain of adds: as cheap eagerly, and batched it is
        # two calls per tree instead of one per node. torch.zeros keeps the result a
        # tensor when no node carries a label.
        loss = torch.stack(losses).sum() if losses else torch.zeros(())
        return loss, self.logits(h_root)

    def forward(self, tree: Any) -> Tensor:
        """Sum of the cross-entropy over every node with ``label >= 0``."""
        return self.forward_with_logits(tree)[0]

    def root_logits(self, tree: Any) -> Tensor:
        return self.logits(self.encode(tree)[0])


class ChildSumTreeLSTM(nn.Module):
    """Child-Sum Tree-LSTM, eq. (2)-(8): every node reads a token, any number of children."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        # Gate order [i, o, u]; the U maps carry no bias because W already has one.
        self.w_iou = nn.Linear(embed_dim, 3 * hidden_dim)
        self.u_iou = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)
        self.w_f = nn.Linear(embed_dim, hidden_dim)
        self.u_f = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def cell(self, word_id: int, children: list[State]) -> State:
        x = self.embedding(torch.tensor(word_id))
        if children:
            h_sum = torch.stack([h for h, _ in children], dim=0).sum(0)
        else:
            h_sum = torch.zeros(self.hidden_dim)
        i, o, u = (self.w_iou(x) + self.u_iou(h_sum)).chunk(3)
        c = torch.sigmoid(i) * torch.tanh(u)
        if children:
            wx = self.w_f(x)
            for h_k, c_k in children:
                # One forget gate per child: this is what lets the cell drop a subtree.
                c = c + torch.sigmoid(wx + self.u_f(h_k)) * c_k
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def encode(self, tree: Any) -> State:
        return self.cell(tree.word_id, [self.encode(child) for child in tree.children])

    def logits(self, tree: Any) -> Tensor:
        return self.classifier(self.encode(tree)[0])

    def forward(self, tree: Any) -> Tensor:
        """Cross-entropy of the root's logits against the root's label."""
        return F.cross_entropy(self.logits(tree), torch.tensor(tree.label))
