"""Bidirectional LSTM taggers written for ONE sentence (a list of word ids) in eager PyTorch:
with two ``nn.LSTMCell`` loops (``BiLSTMTagger``), and with one ``nn.LSTM`` call
(``LSTMTagger``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BiLSTMTagger(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_tags: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.fwd = nn.LSTMCell(embed_dim, hidden_dim)
        self.bwd = nn.LSTMCell(embed_dim, hidden_dim)
        self.out = nn.Linear(2 * hidden_dim, num_tags)

    def _run(self, cell: nn.LSTMCell, xs: list[Tensor]) -> list[Tensor]:
        state = (torch.zeros(self.hidden_dim), torch.zeros(self.hidden_dim))
        hs = []
        for x in xs:
            state = cell(x, state)
            hs.append(state[0])
        return hs

    def predict_logits(self, words: list[int]) -> list[Tensor]:
        xs = [self.embedding(torch.tensor(w)) for w in words]
        forward = self._run(self.fwd, xs)
        backward = self._run(self.bwd, xs[::-1])[::-1]
        return [self.out(torch.cat([f, b], dim=0)) for f, b in zip(forward, backward)]

    def forward(self, words: list[int], tags: list[int]) -> Tensor:
        """Sum over tokens of the tag cross-entropy."""
        logits = self.predict_logits(words)
        return sum(F.cross_entropy(l, torch.tensor(t)) for l, t in zip(logits, tags))


class LSTMTagger(nn.Module):
    """The same tagger as one writes it with ``nn.LSTM``: embed the sentence (L, embed),
    run a bidirectional LSTM over it, a linear layer on every token's state."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_tags: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, bidirectional=True)
        self.out = nn.Linear(2 * hidden_dim, num_tags)

    def predict_logits(self, words: list[int]) -> Tensor:
        """Every token's tag logits, (L, num_tags)."""
        states, _ = self.lstm(self.embedding(torch.tensor(words)))
        return self.out(states)

    def forward(self, words: list[int], tags: list[int]) -> Tensor:
        """Sum over tokens of the tag cross-entropy."""
        return F.cross_entropy(self.predict_logits(words), torch.tensor(tags), reduction="sum")
