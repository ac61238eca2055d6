"""A transition-based (shift-reduce) binary constituency parser, written for ONE sentence.

State: a buffer of word vectors (a BiLSTM over the sentence) and a stack of Tree-LSTM states
(h, c). SHIFT moves the buffer front onto the stack as a leaf state; REDUCE pops the top two
stack items and pushes their Tree-LSTM composition. An MLP scores the two actions from the
stack top, the item below it and the buffer front. A sentence of n words is parsed by exactly
2n - 1 transitions; only when both actions are legal (stack >= 2 items and buffer not empty)
is there a decision: otherwise the single legal action is taken without scoring.

Training scores the gold decisions (teacher forcing, cross-entropy per decision). Parsing
picks each decision from the model's own scores with ``int(scores.argmax())``, a read: under
``db.batched`` the sentence is suspended there until every sentence of the minibatch has
reached its next decision, so the decisions of all sentences still run as batched calls.

Helpers: gold transitions and constituent spans of a binary tree (anything with ``children``
and leaves with no children, e.g. ``dynbatch.data.sst.Node``), spans from a transition
sequence, left/right-branching baselines, and unlabelled bracketing scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynbatch as db

SHIFT, REDUCE = 0, 1
State = tuple[Tensor, Tensor]   # (h, c)


# -- transitions and spans --------------------------------------------------------------------

def gold_transitions(tree) -> list[int]:
    """The unique shift-reduce sequence that builds a binary ``tree``: post-order, a leaf is
    SHIFT and an internal node is REDUCE. Raises ValueError on a node with 1 or > 2 children."""
    actions: list[int] = []
    stack = [(tree, False)]
    while stack:
        node, expanded = stack.pop()
        if not node.children:
            actions.append(SHIFT)
        elif expanded:
            actions.append(REDUCE)
        else:
            if len(node.children) != 2:
                raise ValueError(f"not a binary tree: a node has {len(node.children)} children")
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(node.children))
    return actions


def spans_from_transitions(actions: list[int]) -> list[tuple[int, int]]:
    """The word spans [i, j) of the constituents a legal transition sequence builds, in the
    order it builds them (the whole sentence last)."""
    stack: list[tuple[int, int]] = []
    spans = []
    i = 0
    for a in actions:
        if a == SHIFT:
            stack.append((i, i + 1))
            i += 1
        else:
            right = stack.pop()
            left = stack.pop()
            stack.append((left[0], right[1]))
            spans.append(stack[-1])
    return spans


def tree_spans(tree) -> list[tuple[int, int]]:
    """Spans [i, j) of the internal nodes of a binary tree (the root's is (0, n))."""
    return spans_from_transitions(gold_transitions(tree))


def right_branching(n: int) -> list[int]:
    """(w0 (w1 (w2 ...))): shift everything, then reduce."""
    return [SHIFT] * n + [REDUCE] * (n - 1)


def left_branching(n: int) -> list[int]:
    """(((w0 w1) w2) ...): reduce as soon as possible."""
    return [SHIFT] + [SHIFT, REDUCE] * (n - 1) if n else []


def bracket_counts(gold: list[tuple[int, int]], pred: list[tuple[int, int]], n: int,
                   include_root: bool = False) -> tuple[int, int, int]:
    """(matched, gold total, predicted total) over unlabelled spans of internal nodes; the
    trivial whole-sentence span (0, n) is left out unless ``include_root``."""
    keep = (lambda s: True) if include_root else (lambda s: s != (0, n))
    g = {s for s in gold if keep(s)}
    p = {s for s in pred if keep(s)}
    return len(g & p), len(g), len(p)


def is_legal(action: int, stack_size: int, buffer_size: int) -> bool:
    return buffer_size > 0 if action == SHIFT else stack_size >= 2


# -- the model ---------------------------------------------------------------------------------

@db.block
class Leaf(nn.Module):
    """A word in context (forward and backward LSTM states) to a leaf Tree-LSTM state;
    gate order [i, o, u]."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gates = nn.Linear(in_dim, 3 * hidden_dim)

    def forward(self, fwd: Tensor, bwd: Tensor) -> State:
        i, o, u = self.gates(torch.cat([fwd, bwd])).chunk(3)
        c = torch.sigmoid(i) * torch.tanh(u)
        return torch.sigmoid(o) * torch.tanh(c), c


@db.block
class Compose(nn.Module):
    """Binary Tree-LSTM composition of the two top stack items; gates [i, fl, fr, o, u]."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.gates = nn.Linear(2 * hidden_dim, 5 * hidden_dim)

    def forward(self, hl: Tensor, cl: Tensor, hr: Tensor, cr: Tensor) -> State:
        i, fl, fr, o, u = self.gates(torch.cat([hl, hr])).chunk(5)
        c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(fl) * cl + torch.sigmoid(fr) * cr
        return torch.sigmoid(o) * torch.tanh(c), c


@db.block
class Scorer(nn.Module):
    """MLP over [stack top; stack second; buffer front] -> scores of (SHIFT, REDUCE)."""

    def __init__(self, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(3 * hidden_dim, mlp_dim)
        self.out = nn.Linear(mlp_dim, 2)

    def forward(self, s0: Tensor, s1: Tensor, b0: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(torch.cat([s0, s1, b0]))))


class ShiftReduceParser(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int = 64, lstm_dim: int = 64,
                 hidden_dim: int = 64, mlp_dim: int = 64) -> None:
        super().__init__()
        self.lstm_dim = lstm_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.fwd = nn.LSTMCell(embed_dim, lstm_dim)
        self.bwd = nn.LSTMCell(embed_dim, lstm_dim)
        self.leaf = Leaf(2 * lstm_dim, hidden_dim)
        self.compose = Compose(hidden_dim)
        self.scorer = Scorer(hidden_dim, mlp_dim)

    # the per-sentence pieces
    def _lstm(self, cell: nn.LSTMCell, xs: list[Tensor]) -> list[Tensor]:
        h = c = torch.zeros(self.lstm_dim)
        out = []
        for x in xs:
            h, c = cell(x, (h, c))
            out.append(h)
        return out

    def buffer(self, word_ids: list[int]) -> list[State]:
        """Leaf states of the words, in context: a BiLSTM, then the leaf cell."""
        xs = [self.embedding(torch.tensor(w)) for w in word_ids]
        fwd = self._lstm(self.fwd, xs)
        bwd = self._lstm(self.bwd, xs[::-1])[::-1]
        return [self.leaf(f, b) for f, b in zip(fwd, bwd)]

    def _run(self, word_ids: list[int], choose) -> list[int]:
        """Run the transition system; ``choose(scores, t)`` picks transition ``t`` when both
        actions are legal (``scores``: the scorer's output for this state)."""
        buffer = self.buffer(word_ids)
        stack: list[State] = []
        i, n = 0, len(buffer)
        actions: list[int] = []
        while i < n or len(stack) > 1:
            if len(stack) < 2:
                action = SHIFT
            elif i == n:
                action = REDUCE
            else:
                scores = self.scorer(stack[-1][0], stack[-2][0], buffer[i][0])
                action = choose(scores, len(actions))
            if action == SHIFT:
                stack.append(buffer[i])
                i += 1
            else:
                (hr, cr), (hl, cl) = stack.pop(), stack.pop()
                stack.append(self.compose(hl, cl, hr, cr))
            actions.append(action)
        return actions

    def loss(self, word_ids: list[int], gold: list[int]) -> tuple[Tensor, int]:
        """Sum over the decisions of the cross-entropy of the gold action (teacher forcing),
        and the number of decisions (0 for sentences of fewer than 3 words)."""
        losses = []

        def choose(scores, t):
            losses.append(F.cross_entropy(scores, torch.tensor(gold[t])))
            return gold[t]
        actions = self._run(word_ids, choose)
        if actions != gold:
            raise ValueError("the gold transitions do not fit the sentence")
        return (sum(losses) if losses else torch.zeros(())), len(losses)

    def parse(self, word_ids: list[int]) -> list[int]:
        """Greedy parse: each decision is the argmax of the model's scores (a read)."""
        return self._run(word_ids, lambda scores, t: int(scores.argmax()))
