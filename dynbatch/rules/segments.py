"""How a group of steps over sequences of several lengths runs as one call: the rows of
every example concatenated (``Lengths``), one torch call, each step's outputs split back
(ragged.py says which calls take which form). Sums over the sequence add rows into
their example with one ``index_add``; softmax, max and logsumexp over it pad to the
longest.
"""
from __future__ import annotations

import torch

_T = torch.Tensor
_EINSUM = torch.einsum      # as imported (a run replaces hot functions while it records)


class Lengths:
    """The examples of a group of steps and their lengths, read off the gathered parts
    (``parts[j][k]`` is ``(n_j, L_j, ...)``): examples in step order, then row order;
    their rows in that order are the rows of ``cat``. Index tensors are cached per
    distinct group (a decoder's steps repeat the same one)."""

    def __init__(self, parts: list, k: int):
        shapes = [p[k].shape for p in parts]
        self.ns = [s[0] for s in shapes]
        self.ls = [s[1] for s in shapes]
        self.n = sum(self.ns)
        self.key = (tuple(self.ns), tuple(self.ls))

    def cat(self, tensors: list) -> _T:
        """The rows of every example, in order: ``(sum of n_j * L_j, ...)``."""
        flat = [t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) for t in tensors]
        return flat[0] if len(flat) == 1 else torch.cat(flat)

    def rows(self, outputs) -> list[tuple]:
        """Outputs over all rows split into each step's dense ``(n_j, L_j, ...)``."""
        sizes = [n * L for n, L in zip(self.ns, self.ls)]
        split = [o.split(sizes) for o in outputs]
        return [tuple(s[j].reshape(n, L, *s[j].shape[1:]) for s in split)
                for j, (n, L) in enumerate(zip(self.ns, self.ls))]

    def examples(self, outputs) -> list[tuple]:
        """Outputs over all examples split into each step's ``(n_j, ...)``."""
        split = [o.split(self.ns) for o in outputs]
        return [tuple(s[j] for s in split) for j in range(len(self.ns))]

    def index(self, name: str, device) -> _T:
        key = (name, self.key, device)
        found = INDEX.get(key)
        if found is None:
            found = remember(key, self._make(name).to(device))
        return found

    def lengths(self) -> list[int]:
        return [L for n, L in zip(self.ns, self.ls) for _ in range(n)]

    def _make(self, name: str):
        lengths = torch.tensor(self.lengths(), dtype=torch.int64)
        if name == "segment":       # row -> its example
            return torch.repeat_interleave(lengths)
        if name == "lengths":
            return lengths
        # "padded": row -> its place in (examples, longest, ...) flattened
        longest = max(self.ls)
        starts = torch.cumsum(lengths, 0) - lengths
        segment = torch.repeat_interleave(lengths)
        return torch.arange(int(lengths.sum())) - starts[segment] + segment * longest


INDEX: dict = {}       # index tensors of the groups met, by (what, group, device)


def remember(key, value):
    if len(INDEX) > 4096:
        INDEX.clear()
    INDEX[key] = value
    return value


def rows_run(rows: tuple, spread: tuple):
    def run(sigs, parts):
        seq = Lengths(parts, rows[0])
        values = list(parts[0])
        for k in rows:
            values[k] = seq.cat([p[k] for p in parts])
        for k, ones in spread:      # (n, ...) per example -> (rows, 1.., ...) per row
            b = torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k]
            b = b.index_select(0, seq.index("segment", b.device))
            values[k] = b.reshape(b.shape[0], *([1] * ones), *b.shape[1:])
        sig = sigs[0]
        return seq.rows(sig.flat(sig.per_example(values)))
    return run


def _segment_sum(x: _T, seq: Lengths) -> _T:
    return x.new_zeros((seq.n, *x.shape[1:])).index_add(0, seq.index("segment", x.device), x)


def sum_run(k: int, how: str):
    def run(sigs, parts):
        seq = Lengths(parts, k)
        x = seq.cat([p[k] for p in parts])
        total = _segment_sum(x, seq)
        if how == "mean":
            count = seq.index("lengths", x.device).to(x.dtype)
            total = total / count.reshape(-1, *([1] * (x.dim() - 1)))
        return seq.examples((total,))
    return run


def class_loss_run(kx: int, ky: int, reduction: str):
    def run(sigs, parts):
        sig = sigs[0]
        seq = Lengths(parts, kx)
        values = list(parts[0])
        values[kx] = seq.cat([p[kx] for p in parts])
        values[ky] = seq.cat([p[ky] for p in parts])
        _, kw = sig.fill(values)
        kw = dict(kw, reduction="none")
        loss = sig.target(**kw)
        total = _segment_sum(loss, seq)
        if reduction == "mean":     # as PyTorch: over the targets' total class weight
            y = kw["target"]
            keep = (y != kw["ignore_index"]).to(loss.dtype)
            weight = kw.get("weight")
            if weight is not None:
                keep = keep * weight[y.clamp(0, weight.shape[0] - 1)]
            total = total / _segment_sum(keep, seq)
        return seq.examples((total,))
    return run


def padded_run(k: int, fill: float, dim: str, along: bool = False):
    """softmax / log_softmax (``along``) or a reduction over the sequence: rows padded to
    the longest with ``fill`` (-inf: exp gives 0 there, max never picks it), one call over
    dim 1 of (examples, longest, ...), the real rows taken back (``along``) or the
    examples' results as they are."""
    def run(sigs, parts):
        sig = sigs[0]
        seq = Lengths(parts, k)
        x = seq.cat([p[k] for p in parts])
        where = seq.index("padded", x.device)
        longest = max(seq.ls)
        padded = x.new_full((seq.n * longest, *x.shape[1:]), fill)
        values = list(parts[0])
        values[k] = padded.index_copy(0, where, x).reshape(seq.n, longest, *x.shape[1:])
        _, kw = sig.fill(values)
        out = sig.flat(sig.target(**dict(kw, **{dim: 1})))
        if not along:
            return seq.examples(out)
        rows = tuple(o.reshape(seq.n * longest, *o.shape[2:]).index_select(0, where)
                     for o in out)
        return seq.rows(rows)
    return run


def row_dot_run(ka: int, kb: int):
    """(L, d) @ (d,) per example: every row times its example's vector, summed over d."""
    def run(sigs, parts):
        seq = Lengths(parts, ka)
        a = seq.cat([p[ka] for p in parts])
        b = torch.cat([p[kb] for p in parts]) if len(parts) > 1 else parts[0][kb]
        b = b.index_select(0, seq.index("segment", b.device))
        if a.is_floating_point():   # 4x a batch of (1, d) @ (d, 1) products
            dots = torch.linalg.vecdot(a, b)
        else:                       # integers: sum() would promote; complex: no conj
            dots = torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).reshape(a.shape[0])
        return seq.rows((dots,))
    return run


def weighted_sum_run(ka: int, kb: int):
    """(L,) @ (L[, d]): each row of b weighted by a's, summed over the example's rows."""
    def run(sigs, parts):
        seq = Lengths(parts, ka)
        a = seq.cat([p[ka] for p in parts])
        b = seq.cat([p[kb] for p in parts])
        rows = a.unsqueeze(1) * b if b.dim() == 2 else a * b
        return seq.examples((_segment_sum(rows, seq),))
    return run


def einsum_run(rows: tuple, spread: tuple, equation: str):
    """An einsum over rows, ``equation`` with the sequence's index added to the terms of
    the spread operands (ragged.py, ``einsum_form``)."""
    def run(sigs, parts):
        seq = Lengths(parts, rows[0])
        values = list(parts[0])
        for k in rows:
            values[k] = seq.cat([p[k] for p in parts])
        for k in spread:
            b = torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k]
            values[k] = b.index_select(0, seq.index("segment", b.device))
        args, kwargs = sigs[0].fill(values)
        return seq.rows((_EINSUM(equation, *args[1:], **kwargs),))
    return run
