"""A GRU encoder-decoder written for ONE sequence in plain eager PyTorch.

The encoder reads the input tokens one at a time; the decoder starts from the encoder's last
state and either scores a given target (teacher forcing, ``loss``) or decodes greedily,
choosing each next token with ``int(logits.argmax())`` until it emits ``eos`` or reaches
``max_len`` (``greedy``). Under ``db.batched`` that read suspends the sequence until every
sequence of the minibatch has reached its own read, so the steps of all sequences still run
as batched calls although each stops at its own end token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Seq2SeqGRU(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, bos: int,
                 eos: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.bos, self.eos = bos, eos
        self.src_embedding = nn.Embedding(vocab_size, embed_dim)
        self.tgt_embedding = nn.Embedding(vocab_size, embed_dim)
        self.encoder = nn.GRUCell(embed_dim, hidden_dim)
        self.decoder = nn.GRUCell(embed_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def encode(self, src: list[int]) -> Tensor:
        """The initial decoder state: the encoder GRU's last state over ``src``."""
        h = torch.zeros(self.hidden_dim)
        for token in src:
            h = self.encoder(self.src_embedding(torch.tensor(token)), h)
        return h

    def step(self, token: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """One decoder step: feed ``token``, return (logits of the next token, new state)."""
        h = self.decoder(self.tgt_embedding(torch.tensor(token)), h)
        return self.out(h), h

    def loss(self, src: list[int], tgt: list[int]) -> Tensor:
        """Mean cross-entropy of ``tgt + [eos]`` given ``src`` (teacher forcing)."""
        h = self.encode(src)
        prev, losses = self.bos, []
        for token in list(tgt) + [self.eos]:
            logits, h = self.step(prev, h)
            losses.append(F.cross_entropy(logits, torch.tensor(token)))
            prev = token
        return sum(losses) / len(losses)

    def greedy(self, src: list[int], max_len: int) -> list[int]:
        """Greedy decoding: the tokens before ``eos`` (at most ``max_len`` steps)."""
        h = self.encode(src)
        token, out = self.bos, []
        for _ in range(max_len):
            logits, h = self.step(token, h)
            token = int(logits.argmax())          # a read: the next step depends on it
            if token == self.eos:
                break
            out.append(token)
        return out


def greedy_padded(model: Seq2SeqGRU, srcs: list[list[int]], max_len: int) -> list[list[int]]:
    """Hand-batched reference for ``Seq2SeqGRU.greedy``: what one writes by hand for a
    minibatch (pad, mask, one read of the whole batch per step). Same results up to float
    rounding; used by examples/greedy_decode.py as the speed reference."""
    n = len(srcs)
    lengths = torch.tensor([len(s) for s in srcs])
    width = int(lengths.max())
    tokens = torch.tensor([list(s) + [0] * (width - len(s)) for s in srcs])
    h = torch.zeros(n, model.hidden_dim)
    for t in range(width):
        new = model.encoder(model.src_embedding(tokens[:, t]), h)
        h = torch.where((t < lengths).unsqueeze(1), new, h)
    token = torch.full((n,), model.bos, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    steps = []
    for _ in range(max_len):
        h = model.decoder(model.tgt_embedding(token), h)
        token = model.out(h).argmax(1)
        done = done | (token == model.eos)
        steps.append(torch.where(done, -1, token))
        if bool(done.all()):
            break
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in srcs]
    return [row[:row.index(-1)] if -1 in row else row for row in rows]
