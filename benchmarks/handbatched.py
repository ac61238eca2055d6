"""Hand-batched versions of the reference models: what an expert writes without dynbatch.

Each function takes the eager model and uses its own submodules, so results match the
per-example code on the same weights. Trees run level by level (node height), every index
list is built in Python once per minibatch and shipped to the device in a single copy.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from dynbatch.models import BiLSTMTagger, BinaryTreeLSTM, ChildSumTreeLSTM, LSTMTagger


def _by_height(trees: Sequence[Any]) -> tuple[list[list[Any]], list[int], dict[int, int]]:
    """Nodes in row order (grouped by height, leaves first), their tree index, id -> row."""
    levels: list[list[tuple[Any, int]]] = []

    def visit(node: Any, t: int) -> int:
        height = 1 + max(visit(c, t) for c in node.children) if node.children else 0
        if height == len(levels):
            levels.append([])
        levels[height].append((node, t))
        return height

    for t, tree in enumerate(trees):
        visit(tree, t)
    nodes = [[n for n, _ in level] for level in levels]
    tree_of = [t for level in levels for _, t in level]
    row = {id(n): r for r, n in enumerate(n for level in nodes for n in level)}
    return nodes, tree_of, row


def _to_device(lists: list[list[int]], device: torch.device) -> list[Tensor]:
    # One host-to-device copy for the whole minibatch instead of one per index list.
    flat = torch.tensor([v for l in lists for v in l], dtype=torch.long, device=device)
    return list(flat.split([len(l) for l in lists]))


def binary_routing(trees: Sequence[Any]) -> tuple[Tensor, list[int]]:
    """Every index list the binary Tree-LSTM's minibatch needs (leaf words, labels, each
    row's tree, root rows, each level's children), flat in one int64 tensor, and their
    lengths: pure Python over the trees, so a DataLoader worker can make it ahead."""
    nodes, tree_of, row = _by_height(trees)
    # A 1- and a 3-child node in one level would otherwise misroute silently.
    if any(len(n.children) != 2 for level in nodes[1:] for n in level):
        raise ValueError("BinaryTreeLSTM needs every internal node to have exactly 2 children")
    kids = [[row[id(c)] for n in level for c in n.children] for level in nodes[1:]]
    lists = [[n.word_id for n in nodes[0]],
             [n.label if n.label >= 0 else -1 for level in nodes for n in level],
             tree_of, [row[id(t)] for t in trees], *kids]
    return torch.tensor([v for l in lists for v in l], dtype=torch.long), \
        [len(l) for l in lists]


def _binary_states(
    model: BinaryTreeLSTM, trees: Sequence[Any], routing=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h of every node in row order, plus per-row labels, per-row tree index, root rows.
    ``routing``: ``binary_routing(trees)``, made ahead (else made here)."""
    flat, sizes = routing if routing is not None else binary_routing(trees)
    # One host-to-device copy for the whole minibatch instead of one per index list.
    words, labels, tree_idx, roots, *kids = \
        flat.to(model.classifier.weight.device).split(sizes)
    H = model.hidden_dim
    i, o, u = model.leaf_gates(model.embedding(words)).chunk(3, 1)
    c_all = torch.sigmoid(i) * torch.tanh(u)
    h_all = torch.sigmoid(o) * torch.tanh(c_all)
    for idx in kids:
        n = idx.numel() // 2
        # Rows come interleaved (left, right), so a view gives [hl; hr] and [cl; cr] for free.
        z = model.node_gates(h_all.index_select(0, idx).view(n, 2 * H))
        g = torch.sigmoid(z[:, :4 * H])
        # Gate layout [i, fl, fr, o, u] puts fl, fr next to each other: one mul for both children.
        fc = (g[:, H:3 * H] * c_all.index_select(0, idx).view(n, 2 * H)).view(n, 2, H).sum(1)
        c = g[:, :H] * torch.tanh(z[:, 4 * H:]) + fc
        h = g[:, 3 * H:] * torch.tanh(c)
        # Children may sit at any lower height, so states grow as one buffer addressed by row.
        h_all = torch.cat([h_all, h], 0)
        c_all = torch.cat([c_all, c], 0)
    return h_all, labels, tree_idx, roots


def handbatched_binary_treelstm_loss(model: BinaryTreeLSTM, trees: Sequence[Any],
                                     routing=None) -> Tensor:
    """Per-tree sum of node losses (nodes with label < 0 excluded), shape [len(trees)]."""
    h_all, labels, tree_idx, _ = _binary_states(model, trees, routing)
    losses = F.cross_entropy(model.logits(h_all), labels, reduction="none", ignore_index=-1)
    return losses.new_zeros(len(trees)).index_add(0, tree_idx, losses)


def handbatched_binary_treelstm_root_logits(model: BinaryTreeLSTM, trees: Sequence[Any],
                                            routing=None) -> Tensor:
    """Root logits, shape [len(trees), num_classes]."""
    h_all, _, _, roots = _binary_states(model, trees, routing)
    return model.logits(h_all.index_select(0, roots))


def _childsum_root_h(model: ChildSumTreeLSTM, trees: Sequence[Any]) -> Tensor:
    nodes, _, row = _by_height(trees)
    edges = [[(row[id(c)], p) for p, n in enumerate(level) for c in n.children] for level in nodes[1:]]
    words, roots, *idx = _to_device(
        [[n.word_id for level in nodes for n in level], [row[id(t)] for t in trees]]
        + [l for e in edges for l in ([c for c, _ in e], [p for _, p in e])],
        model.classifier.weight.device)
    H, n_leaves = model.hidden_dim, len(nodes[0])
    x = model.embedding(words)
    # Word-side projections do not depend on children: one matmul each for the whole batch.
    wiou = model.w_iou(x)
    wf = model.w_f(x[n_leaves:])
    # Leaves: h~ = 0 so U h~ vanishes.
    g = torch.sigmoid(wiou[:n_leaves, :2 * H])
    c_all = g[:, :H] * torch.tanh(wiou[:n_leaves, 2 * H:])
    h_all = g[:, H:] * torch.tanh(c_all)
    lo = n_leaves
    for level, child, parent in zip(nodes[1:], idx[::2], idx[1::2]):
        n, hi = len(level), lo + len(level)
        h_k, c_k = h_all.index_select(0, child), c_all.index_select(0, child)
        iou = wiou[lo:hi] + model.u_iou(h_k.new_zeros(n, H).index_add(0, parent, h_k))
        # All child edges of the level at once: one forget gate per edge, summed into parents.
        f = torch.sigmoid(wf[lo - n_leaves:hi - n_leaves].index_select(0, parent) + model.u_f(h_k))
        g = torch.sigmoid(iou[:, :2 * H])
        c = g[:, :H] * torch.tanh(iou[:, 2 * H:]) + c_k.new_zeros(n, H).index_add(0, parent, f * c_k)
        h = g[:, H:] * torch.tanh(c)
        h_all, c_all, lo = torch.cat([h_all, h], 0), torch.cat([c_all, c], 0), hi
    return h_all.index_select(0, roots)


def handbatched_childsum_root_logits(model: ChildSumTreeLSTM, trees: Sequence[Any]) -> Tensor:
    """Root logits, shape [len(trees), num_classes]."""
    return model.classifier(_childsum_root_h(model, trees))


def handbatched_childsum_loss(model: ChildSumTreeLSTM, trees: Sequence[Any]) -> Tensor:
    """Per-tree root cross-entropy, shape [len(trees)]."""
    labels = torch.tensor([t.label for t in trees], device=model.classifier.weight.device)
    return F.cross_entropy(handbatched_childsum_root_logits(model, trees), labels, reduction="none")


# One weightless nn.LSTM shell per tagger: functional_call swaps the cells' own parameters in,
# so gradients land on the LSTMCells and nothing is copied.
_LSTM_SHELLS: "weakref.WeakKeyDictionary[BiLSTMTagger, nn.LSTM]" = weakref.WeakKeyDictionary()


def _lstm_shell(model: BiLSTMTagger) -> tuple[nn.LSTM, dict[str, Tensor]]:
    shell = _LSTM_SHELLS.get(model)
    if shell is None:
        shell = nn.LSTM(model.fwd.input_size, model.hidden_dim, batch_first=True, bidirectional=True)
        _LSTM_SHELLS[model] = shell
    params = {}
    for suffix, cell in (("", model.fwd), ("_reverse", model.bwd)):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            params[f"{name}_l0{suffix}"] = getattr(cell, name)
    return shell, params


def _packed_tagger_logits(model: BiLSTMTagger | LSTMTagger, sentences: Sequence[Sequence[int]]
                          ) -> tuple[Tensor, list[int], list[int]]:
    """Logits of every token in packed order (time-major over the length-sorted batch), with
    each packed row's sentence index and position."""
    device = model.out.weight.device
    order = sorted(range(len(sentences)), key=lambda b: -len(sentences[b]))
    lengths = [len(sentences[b]) for b in order]
    T = lengths[0]
    packed_rows = [b for t in range(T) for b in order if len(sentences[b]) > t]
    packed_pos = [t for t in range(T) for b in order if len(sentences[b]) > t]
    padded = [list(sentences[b]) + [0] * (T - len(sentences[b])) for b in order]
    words = torch.tensor([w for s in padded for w in s], dtype=torch.long, device=device)
    x = model.embedding(words.view(len(order), T))
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=True)
    if isinstance(model, LSTMTagger):       # its own nn.LSTM
        out, _ = model.lstm(packed)
    else:
        shell, params = _lstm_shell(model)
        out, _ = functional_call(shell, params, (packed,))
    return model.out(out.data), packed_rows, packed_pos


def padded_tagger_loss(model: BiLSTMTagger | LSTMTagger, sentences: Sequence[Sequence[int]],
                       tags: Sequence[Sequence[int]]) -> Tensor:
    """Per-sentence sum of token losses, shape [len(sentences)]; sentences must be non-empty."""
    logits, packed_rows, packed_pos = _packed_tagger_logits(model, sentences)
    # Packed data is time-major over the length-sorted batch; build targets in that order too.
    targets, sent_idx = _to_device(
        [[tags[b][t] for b, t in zip(packed_rows, packed_pos)], packed_rows], logits.device)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses.new_zeros(len(sentences)).index_add(0, sent_idx, losses)


def padded_tagger_logits(model: BiLSTMTagger | LSTMTagger, sentences: Sequence[Sequence[int]]) -> Tensor:
    """Every token's logits in sentence order (sentence 0's tokens first), shape
    [total tokens, num_tags]; sentences must be non-empty."""
    logits, packed_rows, packed_pos = _packed_tagger_logits(model, sentences)
    offsets = [0]
    for s in sentences:
        offsets.append(offsets[-1] + len(s))
    # Where each packed row goes in sentence order; one scatter puts them all in place.
    dest = torch.tensor([offsets[b] + t for b, t in zip(packed_rows, packed_pos)],
                        dtype=torch.long, device=logits.device)
    return logits.new_empty(logits.shape).index_copy(0, dest, logits)
