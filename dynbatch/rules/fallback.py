"""The batched calls of calls no rule batches: ``torch.func.vmap``, which defines the
semantics of batching, and when vmap cannot batch the call either, one call per example,
results stacked. Both take the batch's per-example values (``values[k]``: the batched
tensor of every node's k-th input) and a ``fill`` that puts one set of values into the
call's template, giving ``(args, kwargs)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

_embedding = F.embedding     # as imported (a run replaces it by a wrapper while it records)
STRICT = False      # dynbatch.testing.strict(): running one example at a time is an error


def alone(key, kwargs: dict) -> str | None:
    """Why a call must run one example at a time, or None. A call whose result depends on
    the other calls in its batch cannot batch, even through vmap: ``F.embedding`` with
    ``scale_grad_by_freq`` scales each row's gradient by how often its index occurs in
    the call's whole input."""
    if key is _embedding and kwargs.get("scale_grad_by_freq"):
        return ("F.embedding with scale_grad_by_freq=True scales gradients by each call's "
                "own index counts")
    return None


def vmap_call(target, fill, values: list):
    def one(*xs):
        args, kwargs = fill(xs)
        return target(*args, **kwargs)
    return torch.func.vmap(one)(*values)


def loop_call(target, fill, values: list, n: int):
    """One call per example (``n`` of them), each output stacked over the examples."""
    rows = []
    for i in range(n):
        args, kwargs = fill([v[i] for v in values])
        rows.append(tree_flatten(target(*args, **kwargs)))
    spec = rows[0][1]
    leaves = [torch.stack([r[0][j] for r in rows]) for j in range(len(rows[0][0]))]
    return tree_unflatten(leaves, spec)
