"""Ragged forms: which calls over sequences of different lengths run as one call, and
how (the registry, ``form_of``; ``einsum_form`` reads an einsum's equation). A call
without a form keeps one signature, and one batch, per length: exact either way.
The calls themselves are in segments.py.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ..lazy import Input, TensorMeta, with_length
from . import segments, table
from .registry import rule_for

_T = torch.Tensor

# NOTE [ragged groups]: a per-example tensor whose dim 0 is a sequence (a sentence's L
# tokens) gives every length its own signature, and dense batching one batch per length.
# Many calls compute every length alike: they treat rows independently (elementwise ops,
# Linear, Embedding, layer_norm, softmax over a trailing dim), reduce over the sequence
# (sum, mean, max, cross entropy over a sentence's tokens, a dot product over L),
# normalise over it (softmax over dim 0), or run a recurrent module along it (native.py).
# Such a signature has a ``Ragged`` form (``sig.ragged``) and the tracer gives it a
# ``family`` (its key with the ragged lengths left out, ``family_of``). The schedule
# batches a family as one; the plan splits the batch into one step per length, each with
# its own dense store entry as for any step, marked to run jointly (``Step.joint``);
# execute gathers each step's inputs and calls ``Ragged.run`` once: rows concatenated,
# one call, the outputs split back into each step's entry. A new length of a known form
# is not inferred again (signature.py, ``_at_length``).


class Ragged:
    """How signatures that differ only in their ragged inputs' lengths run as one call.
    ``rows``: the positions (in ``sig.inputs``) of the ragged inputs, all of one length
    per example; ``along``: its outputs (an RNN module's first) run along the sequence,
    else they do not depend on its length; ``run(sigs, parts)``: ``parts[j]`` the
    gathered inputs of the step of ``sigs[j]`` (dense, ``(n_j, L_j, ...)`` for a ragged
    input), returns each step's tuple of outputs, dense as that signature's own batched
    call gives them."""

    __slots__ = ("rows", "run", "kind", "along")

    def __init__(self, rows: tuple, run, kind: str):
        self.rows, self.run, self.kind = rows, run, kind
        self.along = kind in ("rows", "softmax over the sequence", "packed")

    def __repr__(self) -> str:
        return f"<ragged {self.kind} rows={self.rows}>"


class Family:
    """A token naming a group of signatures that may run jointly: one object per family
    key (interned), so the schedule hashes and compares it by identity."""

    __slots__ = ("__weakref__",)


_FAMILIES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def family_of(key: tuple, sig) -> Family | None:
    """The family of a signature with a ragged form, from its call key: the key with the
    metas of its ragged inputs made length-free. None when the key's metas cannot be
    matched to the signature's inputs."""
    rows = set(sig.ragged.rows)
    parts, k = [], 0
    for part in key:
        if type(part) is TensorMeta:
            if k in rows:
                part = with_length(part, -1)
            k += 1
        parts.append(part)
    if k != len(sig.inputs):
        return None
    parts = tuple(parts)
    try:
        family = _FAMILIES.get(parts)
        if family is None:
            family = _FAMILIES.setdefault(parts, Family())
    except TypeError:       # an unhashable part: no family
        return None
    return family


# -- the registry: which ops may take ragged inputs ------------------------------------------

_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_LOSSES = {F.cross_entropy, F.nll_loss}
_SUMS = {torch.sum: "sum", torch.mean: "mean"}
_MATMUL = {torch.matmul, _T.__matmul__, torch.mm, torch.mv, torch.dot}
# reductions over the sequence computed on rows padded to the longest with a value that
# leaves every example's result as it is
_PADDED = {torch.amax: -math.inf, torch.max: -math.inf, torch.logsumexp: -math.inf,
           torch.amin: math.inf, torch.min: math.inf}
_NOT_ROWWISE = {torch.tril, torch.triu}     # first-argument ops that read the row index
_LINEAR = F.linear          # as imported (a run replaces it by a wrapper while it records)
_NORMS = {F.layer_norm, getattr(F, "rms_norm", None)}


def form_of(key, canon: dict, inputs: tuple, outputs: tuple) -> Ragged | None:
    """The ragged form of an op in canonical form (``canon`` holds ``Input`` markers), or
    None: the op stays one signature per length."""
    if not inputs or not outputs or not inputs[0].shape:
        return None
    if any(type(v) in (list, tuple) and any(type(x) is Input for x in v)
           for v in canon.values()):
        return None
    marks = {n: v for n, v in canon.items() if type(v) is Input}
    if not marks:
        return None
    rule = rule_for(key)
    if rule is table.elementwise:
        return _elementwise(canon, marks, outputs)
    if rule is table.first_arg and key not in _NOT_ROWWISE:
        return _first_arg(key, canon, marks, outputs)
    if key in _SOFTMAX:
        return _softmax(canon, marks, outputs)
    if key in _LOSSES:
        return _class_loss(canon, marks, outputs)
    if key in _SUMS:
        return _sum(_SUMS[key], canon, marks, outputs)
    if key in _PADDED:
        return _padded_reduction(_PADDED[key], canon, marks)
    if key in _MATMUL:
        return _matmul(canon, marks, outputs)
    if key is _T.__getitem__:
        return _getitem(canon, marks, outputs)
    return None


def _elementwise(canon, marks, outputs):
    """Rows of every per-example operand of the result's rank; a per-example operand of
    lower rank is spread to every row of its example (it broadcasts over the sequence)."""
    out = outputs[0]
    rank = len(out.shape)
    if rank == 0 or len(outputs) != 1:
        return None
    L = out.shape[0]
    dtypes = {v.meta.dtype for v in marks.values()}
    rows, spread = [], []
    for v in marks.values():
        r = len(v.meta.shape)
        if r == rank and v.meta.shape[0] == L:
            rows.append(v.k)
        elif r < rank:
            # spread to rows, a 0-d operand gets a dim: type promotion weighs it otherwise
            if r == 0 and len(dtypes) > 1:
                return None
            spread.append((v.k, rank - 1 - r))
        else:
            return None
    for v in canon.values():
        # a shared operand must not span the sequence; one of another dtype than the
        # result would get its gradient summed over every row in the result's precision
        # (over one example's rows in eager code)
        if isinstance(v, _T) and ((v.dim() == rank and v.shape[0] != 1) or
                                  v.dtype != out.dtype):
            return None
    if not rows:
        return None
    return Ragged(tuple(rows), segments.rows_run(tuple(rows), tuple(spread)), "rows")


def _first_arg(key, canon, marks, outputs):
    """The op on the trailing dims of its one per-example argument: every row alone."""
    if len(marks) != 1:
        return None
    (name, x), = marks.items()
    if name != next(iter(canon)):
        return None
    rank = len(x.meta.shape)
    if key is _LINEAR and rank < 2:
        return None
    if key in _NORMS and len(canon["normalized_shape"]) >= rank:
        return None
    L = x.meta.shape[0]
    if rank == 0 or any(not o.shape or o.shape[0] != L for o in outputs):
        return None
    return Ragged((x.k,), segments.rows_run((x.k,), ()), "rows")


def _getitem(canon, marks, outputs):
    """``x[:, ...]``: every row indexed alike by ints, slices and None."""
    x, index = canon["input"], canon["other"]
    if type(x) is not Input or len(marks) != 1 or type(index) is not tuple or not index:
        return None
    if index[0] != slice(None) or not all(type(i) in (int, slice, type(None))
                                          for i in index[1:]):
        return None
    if not outputs[0].shape or outputs[0].shape[0] != x.meta.shape[0]:
        return None
    return Ragged((x.k,), segments.rows_run((x.k,), ()), "rows")


def _dim(canon, rank: int):
    dim = canon.get("dim")
    return dim % rank if type(dim) is int and -rank <= dim < rank else None


def _softmax(canon, marks, outputs):
    x = canon["input"]
    if type(x) is not Input or len(marks) != 1:
        return None
    rank = len(x.meta.shape)
    dim = _dim(canon, rank)
    if dim is None:
        return None
    if dim != 0:
        return Ragged((x.k,), segments.rows_run((x.k,), ()), "rows")
    return Ragged((x.k,), segments.padded_run(x.k, -math.inf, "dim", along=True),
                  "softmax over the sequence")


def _class_loss(canon, marks, outputs):
    """Token losses (L, C) against (L,) targets: rows with reduction 'none', one sum per
    example for 'sum', divided by its targets' total weight for 'mean'."""
    x, y = canon["input"], canon["target"]
    if type(x) is not Input or type(y) is not Input or len(x.meta.shape) != 2 or \
            len(y.meta.shape) != 1 or y.meta.shape[0] != x.meta.shape[0]:
        return None
    if canon.get("size_average") is not None or canon.get("reduce") is not None or \
            isinstance(canon.get("weight"), Input) or \
            (canon.get("label_smoothing") and canon.get("weight") is not None):
        return None
    reduction = canon["reduction"]
    if reduction == "none":
        return Ragged((x.k, y.k), segments.rows_run((x.k, y.k), ()), "rows")
    if reduction not in ("sum", "mean"):
        return None
    return Ragged((x.k, y.k), segments.class_loss_run(x.k, y.k, reduction), "sum over the sequence")


def _sum(how, canon, marks, outputs):
    """sum / mean over dim 0 (or over every dim of a vector), in the input's dtype."""
    x = canon["input"]
    if type(x) is not Input or len(marks) != 1 or canon.get("dtype") is not None or \
            canon.get("keepdim") or not x.meta.dtype.is_floating_point:
        return None
    rank = len(x.meta.shape)
    dim = canon.get("dim")
    if type(dim) in (list, tuple) and len(dim) == 1:
        dim = dim[0]
    if dim is None and rank != 1:
        return None
    if dim is not None and (type(dim) is not int or not -rank <= dim < rank or dim % rank):
        return None
    if outputs[0].dtype != x.meta.dtype:
        return None
    return Ragged((x.k,), segments.sum_run(x.k, how), f"{how} over the sequence")


def _padded_reduction(fill: float, canon, marks):
    """max / min / amax / amin / logsumexp over dim 0 (indices, for max and min, count
    within the example, as eager's)."""
    x = canon["input"]
    if type(x) is not Input or len(marks) != 1 or canon.get("keepdim") or \
            not x.meta.dtype.is_floating_point:
        return None
    rank = len(x.meta.shape)
    dim = canon.get("dim")
    if type(dim) in (list, tuple) and len(dim) == 1:
        dim = dim[0]
    if type(dim) is not int or not -rank <= dim < rank or dim % rank:
        return None
    return Ragged((x.k,), segments.padded_run(x.k, fill, "dim"), "reduced over the sequence")


def _matmul(canon, marks, outputs):
    """(L, d) @ shared (d[, k]): rows. (L, d) @ a per-example (d,): each row's dot product
    with its example's vector. (L,) @ (L[, d]): a sum over the sequence."""
    a, b = canon.get("input"), canon.get("other", canon.get("vec", canon.get("mat2",
                                                                             canon.get("tensor"))))
    if type(a) is not Input:
        return None
    ra = len(a.meta.shape)
    if type(b) is not Input:
        if ra == 2 and isinstance(b, _T) and b.dim() in (1, 2):
            return Ragged((a.k,), segments.rows_run((a.k,), ()), "rows")
        return None
    rb = len(b.meta.shape)
    if ra == 2 and rb == 1 and b.meta.shape[0] == a.meta.shape[1]:
        return Ragged((a.k,), segments.row_dot_run(a.k, b.k), "rows")
    if ra == 1 and rb in (1, 2) and b.meta.shape[0] == a.meta.shape[0]:
        return Ragged((a.k, b.k), segments.weighted_sum_run(a.k, b.k), "sum over the sequence")
    return None


def einsum_form(targs: tuple, outputs: tuple) -> Ragged | None:
    """``torch.einsum(equation, *operands)`` (no schema binds it): the sequence is the
    first index of the first per-example operand and of the result. A per-example operand
    without that index spreads to its example's rows (the index is added to its term); a
    shared one must not have it. Explicit ``->`` only, no ellipsis."""
    if not targs or type(targs[0]) is not str or len(outputs) != 1:
        return None
    operands = targs[1] if len(targs) == 2 and type(targs[1]) in (list, tuple) else targs[1:]
    equation = targs[0].replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        return None
    marks = [(t, x) for t, x in zip(terms, operands) if type(x) is Input]
    if not marks or not marks[0][0] or not out or not outputs[0].shape:
        return None
    letter, length = marks[0][0][0], marks[0][1].meta.shape[0]
    if out[0] != letter or out.count(letter) != 1 or outputs[0].shape[0] != length:
        return None
    rows, spread, new_terms = [], [], []
    for t, x in zip(terms, operands):
        if type(x) is Input:
            if t.startswith(letter) and t.count(letter) == 1 and x.meta.shape[0] == length:
                rows.append(x.k)
            elif letter not in t:
                spread.append(x.k)
                t = letter + t
            else:
                return None
        elif letter in t:
            return None
        new_terms.append(t)
    rows = tuple(rows)
    return Ragged(rows, segments.einsum_run(rows, tuple(spread), ",".join(new_terms) + "->" +
                                            out), "rows")
